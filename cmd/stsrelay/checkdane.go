package main

import (
	"fmt"
	"strings"

	"github.com/stsrelay/stsrelay/internal/check"
)

// The DNSSEC / DANE section of `stsrelay check`'s text output
// (internal/check assesses).

// printCheckDANE prints the "DNSSEC / DANE" section of the text output.
func printCheckDANE(r *check.Report) {
	fmt.Printf("\nDNSSEC / DANE\n")
	if !r.DNSSEC.ADTrusted {
		fmt.Printf("[info] DANE not assessed: the resolver's AD bit is not trusted (servers %s; dns.trust_ad \"loopback\", the default, trusts only a validating resolver on a loopback address)\n",
			strings.Join(r.DNSSEC.Servers, ", "))
		for _, mx := range r.MX {
			if len(mx.DANE.Records) > 0 {
				fmt.Printf("[info] MX %s: TLSA at %s: %s\n", mx.Host, mx.DANE.TLSAName, shortTLSAs(mx.DANE.Records))
			}
		}
		return
	}
	if !r.DNSSEC.MXSecure {
		fmt.Printf("[info] MX RRset of %s is not DNSSEC-signed: DANE does not apply\n", r.Domain)
		for _, mx := range r.MX {
			if len(mx.DANE.Records) > 0 {
				fmt.Printf("[warn] MX %s: TLSA ignored: zone not signed (%s)\n", mx.Host, shortTLSAs(mx.DANE.Records))
			}
		}
		return
	}
	fmt.Printf("[ok  ] MX RRset of %s: DNSSEC-secure\n", r.Domain)
	for _, mx := range r.MX {
		d := &mx.DANE
		mark := map[string]string{check.DANEAuthenticated: "ok  ", check.DANEMismatch: "FAIL", check.DANEDNSSECFailed: "FAIL",
			check.DANETLSRequired: "warn", check.DANENoCertificate: "warn", check.DANENone: "info", check.DANEInsecure: "info"}[d.Status]
		if d.Status == check.DANEInsecure && len(d.Records) > 0 {
			mark = "warn"
		}
		addrs := map[bool]string{true: "addresses secure", false: "addresses NOT secure"}[d.AddressesSecure]
		fmt.Printf("[%s] MX %s: %s; ", mark, mx.Host, addrs)
		switch d.Status {
		case check.DANEInsecure:
			if len(d.Records) > 0 {
				fmt.Printf("TLSA ignored: zone not signed (%s is not DNSSEC-secure)\n", r.InsecurePart(d))
			} else {
				fmt.Printf("DANE does not apply\n")
			}
		case check.DANENone:
			fmt.Printf("no TLSA at %s: no DANE\n", d.TLSAName)
		case check.DANEDNSSECFailed:
			fmt.Printf("TLSA %s: DNSSEC lookup failed (bogus?) — DANE senders defer: %s\n", d.TLSAName, d.TLSAError)
		default:
			n := 0
			for _, t := range d.Records {
				if t.Usable {
					n++
				}
			}
			fmt.Printf("TLSA %s secure, %d of %d usable\n", d.TLSAName, n, len(d.Records))
		}
		if d.Status == check.DANEInsecure || d.Status == check.DANENone || d.Status == check.DANEDNSSECFailed {
			continue
		}
		for _, t := range d.Records {
			switch {
			case !t.Usable:
				fmt.Printf("       %s  unusable for SMTP\n", shortTLSA(t.Record))
			case len(t.Matches) > 0:
				fmt.Printf("       %s  matches the certificate at %s\n", shortTLSA(t.Record), strings.Join(t.Matches, ", "))
			default:
				fmt.Printf("       %s  matches no certificate now served\n", shortTLSA(t.Record))
			}
		}
		if d.Status == check.DANETLSRequired {
			fmt.Printf("       TLS required but unauthenticated (usages 0/1 are not used for SMTP, RFC 7672 §3.1.3)\n")
		}
		for _, c := range d.Certificates {
			if c.Authenticated || d.Status == check.DANETLSRequired {
				continue
			}
			fmt.Printf("       %s: TLSA for %s does not match the certificate now served — delivery from DANE senders fails (certificate rolled over without updating TLSA?)\n", c.IP, d.BaseDomain)
			if c.Error != "" {
				fmt.Printf("       %s: %s\n", c.IP, c.Error)
			}
			fmt.Printf("       record for the certificate now served: %s. IN TLSA %s\n", d.TLSAOwner(), c.SuggestedRecord)
		}
	}
}

// shortTLSA shortens a record's association data for the text output.
func shortTLSA(rec string) string {
	f := strings.Fields(rec)
	if len(f) == 4 && len(f[3]) > 16 {
		f[3] = f[3][:16] + "…"
	}
	return strings.Join(f, " ")
}

func shortTLSAs(ts []check.TLSA) string {
	parts := make([]string, len(ts))
	for i, t := range ts {
		parts[i] = shortTLSA(t.Record)
	}
	return strings.Join(parts, "; ")
}
