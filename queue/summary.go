package queue

import (
	"sort"
	"time"
)

// AgeBuckets are the upper bounds of Summary's age columns, as in
// Postfix's qshape: a message counts in the first bucket whose bound its
// age does not reach; the last column is for older ones.
var AgeBuckets = []time.Duration{
	5 * time.Minute, 10 * time.Minute, 20 * time.Minute, 40 * time.Minute, 80 * time.Minute,
	160 * time.Minute, 320 * time.Minute, 640 * time.Minute, 1280 * time.Minute,
}

// DomainSummary counts one destination's queued messages by age.
type DomainSummary struct {
	Domain string `json:"domain"`
	Total  int    `json:"total"`
	// Ages has len(AgeBuckets)+1 counts: one per bucket, then older.
	Ages []int `json:"ages"`
	// HeldUntil is set while the destination is held back as dead.
	HeldUntil time.Time `json:"held_until,omitzero"`
}

// Summary is the queue's shape: messages by destination and age.
type Summary struct {
	Total   int             `json:"total"`
	Ages    []int           `json:"ages"`
	Domains []DomainSummary `json:"domains"`
}

func ageBucket(age time.Duration) int {
	for i, b := range AgeBuckets {
		if age < b {
			return i
		}
	}
	return len(AgeBuckets)
}

// Summary counts the queued messages by recipient domain and age, from
// the index alone (a message with recipients in several domains counts
// once for each, its envelope read from disk). Domains come by count,
// largest first.
func (s *Store) Summary(now time.Time) Summary {
	s.mu.Lock()
	defer s.mu.Unlock()
	sum := Summary{Ages: make([]int, len(AgeBuckets)+1)}
	per := map[string]*DomainSummary{}
	add := func(d string, b int) {
		ds := per[d]
		if ds == nil {
			ds = &DomainSummary{Domain: d, Ages: make([]int, len(AgeBuckets)+1)}
			per[d] = ds
		}
		ds.Total++
		ds.Ages[b]++
	}
	s.arena.each(func(slot uint32, e *entry) bool {
		b := ageBucket(now.Sub(IDTime(string(e.id[:]))))
		sum.Total++
		sum.Ages[b]++
		if name := s.doms[e.dom].name; name != multiDomain {
			add(name, b)
			return true
		}
		m, err := s.loadLocked(slot)
		if err != nil {
			add("(unreadable)", b)
			return true
		}
		seen := map[string]bool{}
		for _, r := range m.Env.Rcpts {
			if d := AddrDomain(r.Addr); !seen[d] {
				seen[d] = true
				add(d, b)
			}
		}
		return true
	})
	for _, ds := range per {
		if i, ok := s.domIdx[ds.Domain]; ok {
			if h := s.doms[i].hold; h > now.UnixNano() {
				ds.HeldUntil = time.Unix(0, h).UTC()
			}
		}
		sum.Domains = append(sum.Domains, *ds)
	}
	sort.Slice(sum.Domains, func(i, j int) bool {
		a, b := sum.Domains[i], sum.Domains[j]
		if a.Total != b.Total {
			return a.Total > b.Total
		}
		return a.Domain < b.Domain
	})
	return sum
}
