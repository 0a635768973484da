// Package monitoring holds meshd's Prometheus alert rules and Grafana
// dashboard (the files beside this one), and reads the two things their
// tests check them against: the metrics reference page (docs/metrics.md)
// and the metric names a PromQL expression uses.
package monitoring

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// Metric is one row of the metrics reference page.
type Metric struct {
	Name string
	Type string // counter, gauge, histogram, or "—" for a prefix row
	// Labels are the row's label names, sorted.
	Labels []string
}

var (
	refRow   = regexp.MustCompile("^\\| `([a-z_:*]+)`(?:, `([a-z_:*]+)`)? \\| ([^|]+) \\| [^|]+ \\| ([^|]+) \\|")
	refLabel = regexp.MustCompile("`([a-z_]+)`")
)

// ParseReference reads the metric tables of docs/metrics.md: a row starts
// with the metric's name in backquotes, then type, unit and labels. A name
// ending in "*" stands for every metric with that prefix.
func ParseReference(md string) (map[string]Metric, error) {
	out := map[string]Metric{}
	for line := range strings.SplitSeq(md, "\n") {
		m := refRow.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		var labels []string
		for _, l := range refLabel.FindAllStringSubmatch(m[4], -1) {
			labels = append(labels, l[1])
		}
		slices.Sort(labels)
		for _, name := range m[1:3] {
			if name == "" {
				continue
			}
			if _, dup := out[name]; dup {
				return nil, fmt.Errorf("metrics reference: %s listed twice", name)
			}
			out[name] = Metric{Name: name, Type: strings.TrimSpace(m[3]), Labels: labels}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("metrics reference: no metric rows found")
	}
	return out, nil
}

// Lookup finds the reference row of an exported series name: the metric
// itself, the histogram it is a _bucket, _sum or _count of, or a prefix
// row.
func Lookup(ref map[string]Metric, series string) (Metric, bool) {
	if m, ok := ref[series]; ok {
		return m, true
	}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(series, suf); ok {
			if m, ok := ref[base]; ok && m.Type == "histogram" {
				return m, true
			}
		}
	}
	for name, m := range ref {
		if p, ok := strings.CutSuffix(name, "*"); ok && strings.HasPrefix(series, p) {
			return m, true
		}
	}
	return Metric{}, false
}

// PromQL words that are not metric names where they stand alone.
var promqlWords = map[string]bool{
	"and": true, "or": true, "unless": true, "bool": true, "offset": true,
	"group_left": true, "group_right": true, "inf": true, "nan": true,
}

// Aggregation operators, which may be followed by by/without before "(".
var aggregations = map[string]bool{
	"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true,
	"count": true, "count_values": true, "bottomk": true, "topk": true, "quantile": true,
	"limitk": true, "limit_ratio": true,
}

// Words followed by a parenthesised list of label names.
var labelListWords = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
}

// MetricNames returns the metric names an expression selects, sorted and
// without duplicates. It is a tokenizer, not a full parser (promtool
// checks the syntax): it skips strings, label matchers ({…}), ranges
// ([…]), numbers and durations, function and aggregation names (a word
// followed by "("), keywords, and the label lists of by, without, on,
// ignoring, group_left and group_right. A selector written only as
// {__name__="…"} is an error: it could name anything.
func MetricNames(expr string) ([]string, error) {
	var names []string
	i := 0
	skipSpace := func() {
		for i < len(expr) && strings.ContainsRune(" \t\r\n", rune(expr[i])) {
			i++
		}
	}
	skipTo := func(open, close byte) error {
		depth := 0
		for ; i < len(expr); i++ {
			switch c := expr[i]; {
			case c == '"' || c == '\'' || c == '`':
				end, err := stringEnd(expr, i)
				if err != nil {
					return err
				}
				i = end - 1
			case c == open:
				depth++
			case c == close:
				depth--
				if depth == 0 {
					i++
					return nil
				}
			}
		}
		return fmt.Errorf("unbalanced %c%c in %q", open, close, expr)
	}
	for i < len(expr) {
		c := expr[i]
		switch {
		case c == '{':
			start := i
			if err := skipTo('{', '}'); err != nil {
				return nil, err
			}
			if strings.Contains(expr[start:i], "__name__") {
				return nil, fmt.Errorf("selector by __name__ in %q: name the metric", expr)
			}
		case c == '[':
			if err := skipTo('[', ']'); err != nil {
				return nil, err
			}
		case c == '"' || c == '\'' || c == '`':
			end, err := stringEnd(expr, i)
			if err != nil {
				return nil, err
			}
			i = end
		case c >= '0' && c <= '9' || c == '.':
			for i < len(expr) && (isWordByte(expr[i]) || expr[i] == '.') {
				i++
			}
		case isWordByte(c):
			start := i
			for i < len(expr) && (isWordByte(expr[i]) || expr[i] == ':') {
				i++
			}
			word := expr[start:i]
			skipSpace()
			followedByParen := i < len(expr) && expr[i] == '('
			rest := strings.ToLower(expr[i:])
			if aggregations[strings.ToLower(word)] && (strings.HasPrefix(rest, "by") || strings.HasPrefix(rest, "without")) {
				continue // the clause's label list comes next
			}
			switch {
			case labelListWords[strings.ToLower(word)] && followedByParen:
				if err := skipTo('(', ')'); err != nil {
					return nil, err
				}
			case followedByParen, promqlWords[strings.ToLower(word)]:
			default:
				if !slices.Contains(names, word) {
					names = append(names, word)
				}
			}
		default:
			i++
		}
	}
	slices.Sort(names)
	return names, nil
}

func isWordByte(c byte) bool {
	return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// stringEnd returns the index just after the string literal starting at
// expr[i] (a quote). Backquoted strings have no escapes.
func stringEnd(expr string, i int) (int, error) {
	q := expr[i]
	for j := i + 1; j < len(expr); j++ {
		switch {
		case expr[j] == '\\' && q != '`':
			j++
		case expr[j] == q:
			return j + 1, nil
		}
	}
	return 0, fmt.Errorf("unterminated string in %q", expr)
}
