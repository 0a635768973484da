package hcloudfake

import (
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// The rules below are the API reference's (docs.hetzner.cloud), each
// under the section it comes from. The messages are the fake's own; the
// codes, status codes and field names are the reference's.

// validHostname applies "Servers: Create a Server": "Server names must be
// unique per Project and valid hostnames as per RFC 1123 (i.e. may only
// contain letters, digits, periods, and dashes)". RFC 1123 §2.1 (with RFC
// 952): dot-separated labels of 1 to 63 characters that begin and end
// with a letter or digit; at most 253 characters in all.
func validHostname(n string) error {
	if n == "" || len(n) > 253 {
		return fmt.Errorf("must be 1 to 253 characters")
	}
	for _, label := range strings.Split(n, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("label %q must be 1 to 63 characters", label)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
			if !alnum && (c != '-' || i == 0 || i == len(label)-1) {
				return fmt.Errorf("is not a valid hostname (RFC 1123)")
			}
		}
	}
	return nil
}

// labelPart applies "Labels" to a key's name segment or a value: "a
// string of 63 characters or less ... beginning and ending with an
// alphanumeric character ([a-z0-9A-Z]) with dashes (-), underscores (_),
// dots (.), and alphanumerics between". emptyOK: values may be empty.
func labelPart(s string, emptyOK bool) bool {
	if s == "" {
		return emptyOK
	}
	if len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (!strings.ContainsRune("-_.", rune(c)) || i == 0 || i == len(s)-1) {
			return false
		}
	}
	return true
}

// validLabels applies "Labels": keys are an optional prefix (a DNS
// subdomain of at most 253 characters) and '/', then a name; the
// hetzner.cloud/ prefix is reserved.
func validLabels(l map[string]string) error {
	for k, v := range l {
		name := k
		if prefix, rest, ok := strings.Cut(k, "/"); ok {
			if prefix == "hetzner.cloud" {
				return fmt.Errorf("label key %q: the hetzner.cloud/ prefix is reserved", k)
			}
			if len(prefix) > 253 || validHostname(prefix) != nil {
				return fmt.Errorf("label key %q: prefix is not a DNS subdomain", k)
			}
			name = rest
		}
		if !labelPart(name, false) {
			return fmt.Errorf("label key %q is invalid", k)
		}
		if !labelPart(v, true) {
			return fmt.Errorf("label value %q of key %q is invalid", v, k)
		}
	}
	return nil
}

// matchLabels evaluates a label selector as "Label Selector" defines it:
// comma-separated terms k=v, k==v, k!=v, k, !k, k in (..), k notin (..).
func matchLabels(sel string, labels map[string]string) bool {
	if sel == "" {
		return true
	}
	for _, term := range splitSelector(sel) {
		term = strings.TrimSpace(term)
		switch {
		case strings.Contains(term, " notin "), strings.Contains(term, " in "):
			op := " in "
			if strings.Contains(term, " notin ") {
				op = " notin "
			}
			k, set, _ := strings.Cut(term, op)
			got, has := labels[strings.TrimSpace(k)]
			in := false
			for _, v := range strings.Split(strings.Trim(strings.TrimSpace(set), "()"), ",") {
				in = in || (has && got == strings.TrimSpace(v))
			}
			if in != (op == " in ") {
				return false
			}
		case strings.Contains(term, "!="):
			k, v, _ := strings.Cut(term, "!=")
			if labels[k] == v {
				return false
			}
		case strings.Contains(term, "=="), strings.Contains(term, "="):
			k, v, _ := strings.Cut(strings.Replace(term, "==", "=", 1), "=")
			if got, ok := labels[k]; !ok || got != v {
				return false
			}
		case strings.HasPrefix(term, "!"):
			if _, ok := labels[term[1:]]; ok {
				return false
			}
		default:
			if _, ok := labels[term]; !ok {
				return false
			}
		}
	}
	return true
}

// splitSelector splits at commas outside parentheses.
func splitSelector(sel string) []string {
	var out []string
	depth, start := 0, 0
	for i, c := range sel {
		switch c {
		case '(':
			depth++
		case ')':
			depth--
		case ',':
			if depth == 0 {
				out = append(out, sel[start:i])
				start = i + 1
			}
		}
	}
	return append(out, sel[start:])
}

// cidr parses a CIDR block that must have no host bits set: "Networks"
// ranges, and firewall rules' source_ips/destination_ips, which "may
// refer to networks (with empty host bits) or single hosts".
func cidr(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR block", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%q has host bits set (want %s)", s, p.Masked())
	}
	return p, nil
}

// rfc1918 are the ranges "Networks" allows: "Must be one of the private
// IPv4 ranges of RFC1918".
var rfc1918 = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
}

// validNetworkRange applies "Networks: Create a Network", ip_range: an
// RFC 1918 range, "Minimum network size is /24".
func validNetworkRange(s string) (netip.Prefix, error) {
	p, err := cidr(s)
	if err != nil {
		return p, err
	}
	if !p.Addr().Is4() || p.Bits() > 24 {
		return p, fmt.Errorf("%s: minimum network size is /24", s)
	}
	for _, r := range rfc1918 {
		if r.Bits() <= p.Bits() && r.Contains(p.Addr()) {
			return p, nil
		}
	}
	return p, fmt.Errorf("%s is not one of the private IPv4 ranges of RFC 1918", s)
}

// overlaps reports whether two prefixes share an address: "Subnets can
// not have overlapping IP ranges".
func overlaps(a, b netip.Prefix) bool { return a.Overlaps(b) }

// validRule applies "Firewalls: Create a Firewall", rules[]: direction in
// or out; source_ips for in (and no destination_ips), destination_ips for
// out; protocol tcp, udp, icmp, esp or gre; a port (a number, a range
// a-b, or any) for tcp and udp only; at most 50 rules.
func validRule(r firewallRule) error {
	switch r.Direction {
	case "in":
		if len(r.SourceIPs) == 0 {
			return fmt.Errorf("source_ips is required for direction in")
		}
		if len(r.DestinationIPs) > 0 {
			return fmt.Errorf("destination_ips is not allowed for direction in")
		}
	case "out":
		if len(r.DestinationIPs) == 0 {
			return fmt.Errorf("destination_ips is required for direction out")
		}
		if len(r.SourceIPs) > 0 {
			return fmt.Errorf("source_ips is not allowed for direction out")
		}
	default:
		return fmt.Errorf("direction %q: want in or out", r.Direction)
	}
	for _, ip := range append(append([]string{}, r.SourceIPs...), r.DestinationIPs...) {
		if _, err := cidr(ip); err != nil {
			return err
		}
	}
	switch r.Protocol {
	case "tcp", "udp":
		if r.Port == nil {
			return fmt.Errorf("port is required for protocol %s", r.Protocol)
		}
		if !validPort(*r.Port) {
			return fmt.Errorf("port %q: want a port, a range a-b or any", *r.Port)
		}
	case "icmp", "esp", "gre":
		if r.Port != nil {
			return fmt.Errorf("port is not allowed for protocol %s", r.Protocol)
		}
	default:
		return fmt.Errorf("protocol %q", r.Protocol)
	}
	return nil
}

func validPort(p string) bool {
	if p == "any" {
		return true
	}
	lo, hi, isRange := strings.Cut(p, "-")
	a, err1 := strconv.Atoi(lo)
	b, err2 := a, error(nil)
	if isRange {
		b, err2 = strconv.Atoi(hi)
	}
	return err1 == nil && err2 == nil && a >= 1 && b <= 65535 && a <= b
}

// defaultRateLimit is "Rate Limiting"'s default: 3600 requests per hour
// and per Project, refilled gradually (one per second at 3600).
const defaultRateLimit = 3600

type rateLimit struct {
	limit     int
	remaining float64
	at        time.Time
}

// SetRateLimit sets the hourly limit and how many requests remain now.
func (s *Server) SetRateLimit(limit, remaining int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.limit = rateLimit{limit: limit, remaining: float64(remaining), at: s.Now()}
}

// rateLimitHeaders refills the budget by the clock, takes one request
// from it if spend, and sets the three headers "Rate Limiting" describes:
// RateLimit-Limit (per hour), RateLimit-Remaining, and RateLimit-Reset,
// the UNIX time when the budget is full again. It reports whether a
// request was left.
func (s *Server) rateLimitHeaders(w http.ResponseWriter, spend bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.Now()
	l := &s.limit
	perSec := float64(l.limit) / 3600
	if !l.at.IsZero() {
		l.remaining = math.Min(float64(l.limit), l.remaining+now.Sub(l.at).Seconds()*perSec)
	}
	l.at = now
	ok := l.remaining >= 1
	if ok && spend {
		l.remaining--
	}
	missing := float64(l.limit) - l.remaining
	reset := now.Add(time.Duration(math.Ceil(missing/perSec)) * time.Second)
	h := w.Header()
	h.Set("RateLimit-Limit", strconv.Itoa(l.limit))
	h.Set("RateLimit-Remaining", strconv.Itoa(int(l.remaining)))
	h.Set("RateLimit-Reset", strconv.FormatInt(reset.Unix(), 10))
	return ok
}
