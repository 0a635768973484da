package hcloudfake

import (
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"
)

// Locations the fake knows, with their network zones ("Locations").
var locations = []schema.Location{
	{ID: 1, Name: "fsn1", NetworkZone: "eu-central", City: "Falkenstein", Country: "DE"},
	{ID: 2, Name: "nbg1", NetworkZone: "eu-central", City: "Nuremberg", Country: "DE"},
	{ID: 3, Name: "hel1", NetworkZone: "eu-central", City: "Helsinki", Country: "FI"},
	{ID: 4, Name: "ash", NetworkZone: "us-east", City: "Ashburn, VA", Country: "US"},
	{ID: 5, Name: "hil", NetworkZone: "us-west", City: "Hillsboro, OR", Country: "US"},
	{ID: 6, Name: "sin", NetworkZone: "ap-southeast", City: "Singapore", Country: "SG"},
}

var (
	eu  = []string{"fsn1", "nbg1", "hel1"}
	all = []string{"fsn1", "nbg1", "hel1", "ash", "hil", "sin"}
	// The cpx11–cpx51 and cx22–cx52 families were deprecated in October
	// 2025 and stopped being orderable in the EU locations; the fake
	// dates that at the start of 2026.
	retiredAnnounced = time.Date(2025, 10, 16, 0, 0, 0, 0, time.UTC)
	retiredAfter     = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
)

func dep(announced, after time.Time) *schema.DeprecationInfo {
	return &schema.DeprecationInfo{Announced: announced, UnavailableAfter: after}
}

// st builds a server type. deprecatedIn lists locations where it is
// deprecated; soldOut where it is listed but not available now.
func st(id int64, name, arch, cpu string, cores int, mem float32, in []string, deprecatedIn, soldOut []string) schema.ServerType {
	t := schema.ServerType{ID: id, Name: name, Architecture: arch, CPUType: cpu, Cores: cores, Memory: mem,
		Disk: 40 * cores, StorageType: "local", Category: "shared", Description: name, Prices: []schema.PricingServerTypePrice{}}
	for _, n := range in {
		loc, _ := locationByName(n)
		l := schema.ServerTypeLocation{ID: loc.ID, Name: n, Available: !slices.Contains(soldOut, n), Recommended: true}
		if slices.Contains(deprecatedIn, n) {
			l.Deprecation = dep(retiredAnnounced, retiredAfter)
			l.Available, l.Recommended = false, false
		}
		t.Locations = append(t.Locations, l)
	}
	if len(deprecatedIn) == len(in) {
		// The type-wide field, phased out since 2025-09-24, is still set
		// for a type deprecated everywhere.
		t.Deprecated, t.Deprecation = true, dep(retiredAnnounced, retiredAfter)
	}
	return t
}

// serverTypes is the fake's catalogue ("Server Types": per-location
// availability and deprecation in locations[]).
var serverTypes = []schema.ServerType{
	st(1, "cpx11", "x86", "shared", 2, 2, all, eu, nil),
	st(2, "cpx21", "x86", "shared", 3, 4, all, eu, nil),
	st(3, "cx22", "x86", "shared", 2, 4, eu, eu, nil),
	st(4, "cx32", "x86", "shared", 4, 8, eu, eu, nil),
	st(10, "cpx22", "x86", "shared", 2, 4, all, nil, nil),
	st(11, "cpx32", "x86", "shared", 4, 8, all, nil, []string{"sin"}),
	st(12, "cx23", "x86", "shared", 2, 4, eu, nil, nil),
	st(13, "cx33", "x86", "shared", 4, 8, eu, nil, nil),
	st(20, "cax11", "arm", "shared", 2, 4, eu, nil, nil),
	st(21, "cax21", "arm", "shared", 4, 8, eu, nil, nil),
	st(30, "ccx13", "x86", "dedicated", 2, 8, all, nil, nil),
}

func img(id int64, name, arch string, d *schema.DeprecationInfo) schema.Image {
	n := name
	i := schema.Image{ID: id, Name: &n, Type: "system", Status: "available", Architecture: arch, OSFlavor: "debian",
		DiskSize: 5, Description: name, Labels: map[string]string{}}
	if d != nil {
		i.DeprecatableResource.Deprecation = d
		t := d.Announced
		i.Deprecated = &t
	}
	return i
}

// images is the fake's catalogue of system images: one per name and
// architecture ("Images"), some deprecated.
var images = []schema.Image{
	img(114690387, "debian-12", "x86", nil),
	img(114690389, "debian-12", "arm", nil),
	img(161547269, "ubuntu-24.04", "x86", nil),
	img(161547270, "ubuntu-24.04", "arm", nil),
	img(200000001, "debian-13", "x86", nil),
	img(200000002, "debian-13", "arm", nil),
	// Still orderable until its date, but deprecated.
	img(67794396, "debian-11", "x86", dep(time.Date(2026, 8, 1, 0, 0, 0, 0, time.UTC), time.Date(2027, 2, 1, 0, 0, 0, 0, time.UTC))),
	// No longer orderable.
	img(15512617, "ubuntu-20.04", "x86", dep(time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC), time.Date(2025, 8, 1, 0, 0, 0, 0, time.UTC))),
}

func locationByName(n string) (schema.Location, bool) {
	for _, l := range locations {
		if l.Name == n || strconv.FormatInt(l.ID, 10) == n {
			return l, true
		}
	}
	return schema.Location{}, false
}

func serverTypeBy(idOrName string) (schema.ServerType, bool) {
	for _, t := range serverTypes {
		if t.Name == idOrName || strconv.FormatInt(t.ID, 10) == idOrName {
			return t, true
		}
	}
	return schema.ServerType{}, false
}

// orderable reports whether t can be ordered in loc now: listed there,
// available, and not past its unavailable_after.
func orderable(t schema.ServerType, loc string, now time.Time) bool {
	for _, l := range t.Locations {
		if l.Name == loc {
			return l.Available && (l.Deprecation == nil || now.Before(l.Deprecation.UnavailableAfter))
		}
	}
	return false
}

func byID[T any](items []T, id func(T) int64) map[int64]*T {
	m := map[int64]*T{}
	for i := range items {
		m[id(items[i])] = &items[i]
	}
	return m
}

func (s *Server) listLocations(w http.ResponseWriter, r *http.Request) {
	s.page(w, r, "locations", filter(r, byID(locations, func(l schema.Location) int64 { return l.ID }),
		func(l *schema.Location) string { return l.Name }, func(*schema.Location) map[string]string { return nil },
		func(l *schema.Location) any { return *l }))
}

func (s *Server) listServerTypes(w http.ResponseWriter, r *http.Request) {
	s.page(w, r, "server_types", filter(r, byID(serverTypes, func(t schema.ServerType) int64 { return t.ID }),
		func(t *schema.ServerType) string { return t.Name }, func(*schema.ServerType) map[string]string { return nil },
		func(t *schema.ServerType) any { return *t }))
}

func (s *Server) getServerType(w http.ResponseWriter, r *http.Request) {
	t, ok := serverTypeBy(r.PathValue("id"))
	if !ok {
		notFound(w, "server type")
		return
	}
	writeJSON(w, http.StatusOK, schema.ServerTypeGetResponse{ServerType: t})
}

// listImages filters by name and architecture and, as "Images: Get all
// Images" documents, leaves deprecated images out unless
// include_deprecated=true.
func (s *Server) listImages(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	out := []any{}
	for _, i := range images {
		if n := q.Get("name"); n != "" && *i.Name != n {
			continue
		}
		if a := q["architecture"]; len(a) > 0 && !slices.Contains(a, i.Architecture) {
			continue
		}
		if i.Deprecation != nil && q.Get("include_deprecated") != "true" {
			continue
		}
		out = append(out, i)
	}
	s.page(w, r, "images", out)
}

func (s *Server) getImage(w http.ResponseWriter, r *http.Request) {
	for _, i := range images {
		if strconv.FormatInt(i.ID, 10) == r.PathValue("id") {
			writeJSON(w, http.StatusOK, schema.ImageGetResponse{Image: i})
			return
		}
	}
	notFound(w, "image")
}
