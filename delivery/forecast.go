package delivery

import (
	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// ForecastRecorder counts, per policy domain, the sessions MTA-STS
// enforce refused or would have refused (the enforce forecast; a
// *forecast.Counter). Options.Forecast is nil when nothing counts them.
type ForecastRecorder interface {
	Record(forecast.Session)
}

// forecastSession says what enforce made, or would have made, of a
// counted session of a domain whose policy is in testing or enforce mode;
// ok is false for other domains. d is the host's DANE (TLSA records, all
// unusable, still demand TLS under either mode). The decision (policy.CheckMX, then
// policy.CheckConn on the session's TLS state st; st is nil for a host
// never contacted) is taken with the same policy in mode enforce: for a
// domain in enforce that is the decision delivery took, for one in
// testing the one it would take, so the forecast and enforce itself
// cannot disagree. REQUIRETLS is left out: it refuses in any mode, and is
// not what switching to enforce changes.
func forecastSession(pin policy.Policy, mx string, d policy.DANE, st *policy.ConnState) (s forecast.Session, ok bool) {
	if pin.STS == nil || (pin.TLSRequiredNo && !pin.RequireTLS) {
		return s, false
	}
	switch pin.STS.Mode {
	case mtasts.ModeEnforce:
		s.Mode = forecast.ModeEnforce
	case mtasts.ModeTesting:
		s.Mode = forecast.ModeTesting
	default:
		return s, false
	}
	s.MX = mx
	sts := *pin.STS
	sts.Mode = mtasts.ModeEnforce
	ep := pin
	ep.STS, ep.RequireTLS, ep.TLSRequiredNo = &sts, false, false
	ev := policy.CheckMX(ep, mx, d)
	if ev.Action == policy.Use && st != nil {
		ev = policy.CheckConn(ep, mx, d, *st)
	}
	if ev.Action != policy.Use {
		s.Refused, s.Reason = true, forecastReason(ev)
	}
	return s, true
}

// forecastReason names a refusal: the MX not listed by the policy, or
// the RFC 8460 result type of the TLS failure (a bounded set: the
// forecast metric's reason label).
func forecastReason(v policy.Verdict) string {
	switch {
	case v.ReasonCode == tlsrpt.ReasonMXMismatch:
		return forecast.ReasonMXNotInPolicy
	case v.Result != "":
		return string(v.Result)
	}
	return "unknown"
}
