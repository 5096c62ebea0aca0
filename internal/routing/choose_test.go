package routing

import (
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func excludes(t testing.TB, patterns ...string) []*regexp.Regexp {
	t.Helper()
	res, err := CompileExcludes(patterns)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func mustTable(t testing.TB, targets []Target, def string) *Table {
	t.Helper()
	tab, err := NewTable(targets, def)
	if err != nil {
		t.Fatalf("NewTable: %v", err)
	}
	return tab
}

// down returns an availability function reporting the named targets' breakers open.
func down(names ...string) func(string) string {
	return func(n string) string {
		if slices.Contains(names, n) {
			return "breaker open"
		}
		return ""
	}
}

// outcome is what a Choose call came to, in a form cases can compare.
type outcome struct {
	Target string
	Rule   Rule
	Reason protocol.Reason // set for a *Rejection
	Later  bool            // set for ErrUnavailable
}

func (o outcome) String() string {
	switch {
	case o.Later:
		return "retry later"
	case o.Reason != "":
		return "rejected " + string(o.Reason)
	}
	return fmt.Sprintf("%s by %s", o.Target, o.Rule)
}

func choose(t *testing.T, tab *Table, req Request, unavailable func(string) string) (outcome, Decision, error) {
	t.Helper()
	d, err := tab.Choose(req, unavailable)
	var rej *Rejection
	switch {
	case err == nil:
		if d.Target == "" {
			t.Fatalf("Choose(%q) returned no target and no error", req.Image)
		}
		return outcome{Target: d.Target, Rule: d.Rule}, d, nil
	case errors.As(err, &rej):
		if errors.Is(err, ErrUnavailable) {
			t.Fatalf("Choose(%q) = %v: a rejection must not also be ErrUnavailable", req.Image, err)
		}
		return outcome{Reason: rej.Reason}, d, err
	case errors.Is(err, ErrUnavailable):
		return outcome{Later: true}, d, err
	}
	t.Fatalf("Choose(%q) = unexpected error %v", req.Image, err)
	return outcome{}, d, err
}

func TestChoose(t *testing.T) {
	// A fleet shaped like the one in DESIGN.md: Kata for untrusted builds, runc for the rest,
	// a local target that only takes pinned and default traffic.
	fleet := func(t *testing.T) []Target {
		return []Target{
			{Name: "kata", Weight: 10, Isolated: true, Exclude: excludes(t, "rhel6", `^docker\.io/legacy/`)},
			{Name: "runc", Weight: 90, Exclude: excludes(t, "untrusted")},
			{Name: "local", Weight: 0},
		}
	}
	// An id the weighted choice sends to runc, and one it sends to kata (checked below).
	const toRunc, toKata = "build-0", "build-23"

	tests := []struct {
		name        string
		targets     func(*testing.T) []Target
		def         string
		req         Request
		unavailable []string
		want        outcome
		wantLine    string // a line the explanation must contain, if set
		wantErr     string // text the error must contain, if set
	}{
		// Rule 1: pins.
		{
			name: "pin to existing target", targets: fleet, def: "local",
			req:  Request{BuildID: toRunc, Image: "golang:1.26", Pin: "kata"},
			want: outcome{Target: "kata", Rule: RulePin},
		},
		{
			name: "pin to weight-0 target", targets: fleet,
			req:  Request{BuildID: toRunc, Image: "golang:1.26", Pin: "local"},
			want: outcome{Target: "local", Rule: RulePin},
		},
		{
			name: "pin to unknown target", targets: fleet, def: "local",
			req:     Request{BuildID: toRunc, Image: "golang:1.26", Pin: "gpu"},
			want:    outcome{Reason: protocol.ReasonUnknownTarget},
			wantErr: `pinned target "gpu" does not exist (targets: kata, runc, local)`,
		},
		{
			name: "pin where the image is excluded", targets: fleet, def: "local",
			req:      Request{BuildID: toKata, Image: "registry.example.com/RHEL6:latest", Pin: "kata"},
			want:     outcome{Reason: protocol.ReasonExcludedImage},
			wantLine: `target "kata": excluded, image matches "rhel6"`,
		},
		{
			name: "pin to non-isolated target when isolation is required", targets: fleet, def: "local",
			req:  Request{BuildID: toRunc, Image: "golang:1.26", Pin: "runc", RequireIsolation: true},
			want: outcome{Reason: protocol.ReasonNoEligible},
		},
		{
			name: "pin to isolated target when isolation is required", targets: fleet,
			req:  Request{BuildID: toRunc, Image: "golang:1.26", Pin: "kata", RequireIsolation: true},
			want: outcome{Target: "kata", Rule: RulePin},
		},
		{
			name: "pinned target unavailable waits, even with others up", targets: fleet, def: "local",
			req:         Request{BuildID: toRunc, Image: "golang:1.26", Pin: "kata"},
			unavailable: []string{"kata"},
			want:        outcome{Later: true},
		},
		{
			name: "pin rejection beats unavailability", targets: fleet, def: "local",
			req:         Request{BuildID: toRunc, Image: "rhel6", Pin: "kata"},
			unavailable: []string{"kata"},
			want:        outcome{Reason: protocol.ReasonExcludedImage},
		},

		// Rules 2 and 3: exclusion, isolation, weights.
		{
			name: "weighted to runc", targets: fleet, def: "local",
			req:      Request{BuildID: toRunc, Image: "golang:1.26"},
			want:     outcome{Target: "runc", Rule: RuleWeighted},
			wantLine: `weighted choice among kata (10), runc (90)`,
		},
		{
			name: "weighted to kata", targets: fleet, def: "local",
			req:  Request{BuildID: toKata, Image: "golang:1.26"},
			want: outcome{Target: "kata", Rule: RuleWeighted},
		},
		{
			name: "excluded image never lands on kata", targets: fleet, def: "local",
			req:      Request{BuildID: toKata, Image: "docker.io/legacy/app:1"},
			want:     outcome{Target: "runc", Rule: RuleWeighted},
			wantLine: `target "kata": excluded, image matches "^docker\\.io/legacy/"`,
		},
		{
			name: "exclusion is unanchored and case-insensitive", targets: fleet, def: "local",
			req:  Request{BuildID: toKata, Image: "quay.io/acme/Untrusted-builder:2"},
			want: outcome{Target: "kata", Rule: RuleWeighted},
		},
		{
			name: "isolation keeps the build off runc", targets: fleet, def: "local",
			req:      Request{BuildID: toRunc, Image: "golang:1.26", RequireIsolation: true},
			want:     outcome{Target: "kata", Rule: RuleWeighted},
			wantLine: `target "runc": dropped, not isolated and the build requires isolation`,
		},
		{
			name: "isolation with the isolated target excluding the image", targets: fleet, def: "local",
			req:     Request{BuildID: toRunc, Image: "rhel6", RequireIsolation: true},
			want:    outcome{Reason: protocol.ReasonNoEligible},
			wantErr: `no_eligible_target: no eligible target for image rhel6: kata excludes it ("rhel6"); runc is not isolated; local is not isolated`,
		},

		// Breakers.
		{
			name: "runc breaker open fails over to kata", targets: fleet, def: "local",
			req:         Request{BuildID: toRunc, Image: "golang:1.26"},
			unavailable: []string{"runc"},
			want:        outcome{Target: "kata", Rule: RuleWeighted},
			wantLine:    `target "runc": unavailable (breaker open)`,
		},
		{
			name: "all weighted targets down fails over to default", targets: fleet, def: "local",
			req:         Request{BuildID: toRunc, Image: "golang:1.26"},
			unavailable: []string{"kata", "runc"},
			want:        outcome{Target: "local", Rule: RuleDefault},
		},
		{
			name: "everything down waits", targets: fleet, def: "local",
			req:         Request{BuildID: toRunc, Image: "golang:1.26"},
			unavailable: []string{"kata", "runc", "local"},
			want:        outcome{Later: true},
		},
		{
			name: "only eligible target down waits even without a default", targets: fleet,
			req:         Request{BuildID: toRunc, Image: "rhel6"},
			unavailable: []string{"runc"},
			want:        outcome{Later: true},
		},
		{
			name: "weight-0 target down does not make a rejection transient", targets: fleet,
			req:         Request{BuildID: toRunc, Image: "rhel6-untrusted"},
			unavailable: []string{"local"},
			want:        outcome{Reason: protocol.ReasonNoEligible},
		},
		{
			name: "down target that excludes the image does not make a rejection transient", targets: fleet,
			req:         Request{BuildID: toRunc, Image: "rhel6-untrusted"},
			unavailable: []string{"kata"},
			want:        outcome{Reason: protocol.ReasonNoEligible},
		},

		// Rule 4: the default.
		{
			name: "default takes what every weighted target excludes", targets: fleet, def: "local",
			req:      Request{BuildID: toRunc, Image: "rhel6-untrusted"},
			want:     outcome{Target: "local", Rule: RuleDefault},
			wantLine: `chose default target "local" (rule default)`,
		},
		{
			name: "no default, nothing eligible", targets: fleet,
			req:     Request{BuildID: toRunc, Image: "rhel6-untrusted"},
			want:    outcome{Reason: protocol.ReasonNoEligible},
			wantErr: `no eligible target for image rhel6-untrusted: kata excludes it ("rhel6"); runc excludes it ("untrusted"); local has weight 0 and is not the default`,
		},
		{
			name: "default excluded is never used",
			targets: func(t *testing.T) []Target {
				return []Target{
					{Name: "kata", Weight: 1, Exclude: excludes(t, "rhel6")},
					{Name: "local", Weight: 0, Exclude: excludes(t, "rhel6")},
				}
			},
			def:      "local",
			req:      Request{BuildID: toRunc, Image: "rhel6"},
			want:     outcome{Reason: protocol.ReasonNoEligible},
			wantLine: `default target "local" is not eligible`,
		},
		{
			name: "default not isolated is never used for isolated builds",
			targets: func(t *testing.T) []Target {
				return []Target{
					{Name: "kata", Weight: 1, Isolated: true},
					{Name: "local", Weight: 0},
				}
			},
			def:         "local",
			req:         Request{BuildID: toRunc, Image: "golang", RequireIsolation: true},
			unavailable: []string{"kata"},
			want:        outcome{Later: true},
		},
		{
			name: "default unavailable waits",
			targets: func(t *testing.T) []Target {
				return []Target{{Name: "local", Weight: 0}}
			},
			def:         "local",
			req:         Request{BuildID: toRunc, Image: "golang"},
			unavailable: []string{"local"},
			want:        outcome{Later: true},
			wantLine:    `default target "local" is unavailable`,
		},
		{
			name: "weight-0 target with no default receives nothing",
			targets: func(t *testing.T) []Target {
				return []Target{{Name: "local", Weight: 0}}
			},
			req:  Request{BuildID: toRunc, Image: "golang"},
			want: outcome{Reason: protocol.ReasonNoEligible},
		},
		{
			name: "weighted default is chosen by weight, not by rule 4",
			targets: func(t *testing.T) []Target {
				return []Target{{Name: "local", Weight: 3}}
			},
			def:  "local",
			req:  Request{BuildID: toRunc, Image: "golang"},
			want: outcome{Target: "local", Rule: RuleWeighted},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tab := mustTable(t, tc.targets(t), tc.def)
			got, d, err := choose(t, tab, tc.req, down(tc.unavailable...))
			if got != tc.want {
				t.Fatalf("Choose(%q) = %v (err %v), want %v\nexplanation:\n  %s",
					tc.req.Image, got, err, tc.want, strings.Join(d.Explanation, "\n  "))
			}
			if len(d.Explanation) == 0 {
				t.Errorf("Choose(%q) gave no explanation", tc.req.Image)
			}
			if tc.wantLine != "" && !slices.ContainsFunc(d.Explanation, func(l string) bool {
				return strings.Contains(l, tc.wantLine)
			}) {
				t.Errorf("Choose(%q) explanation lacks %q:\n  %s", tc.req.Image, tc.wantLine, strings.Join(d.Explanation, "\n  "))
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("Choose(%q) error = %v, want it to contain %q", tc.req.Image, err, tc.wantErr)
			}
			var rej *Rejection
			if errors.As(err, &rej) && !slices.Equal(rej.Explanation, d.Explanation) {
				t.Errorf("Choose(%q): rejection explanation %q differs from decision's %q", tc.req.Image, rej.Explanation, d.Explanation)
			}
		})
	}
}

// TestExplanation pins the full explanation of one decision: it is what `buildfleet route`
// prints, so a change to it should be deliberate.
func TestExplanation(t *testing.T) {
	tab := mustTable(t, []Target{
		{Name: "kata", Weight: 10, Isolated: true, Exclude: excludes(t, "rhel6")},
		{Name: "runc", Weight: 90},
		{Name: "spare", Weight: 5},
		{Name: "local", Weight: 0},
	}, "local")
	d, err := tab.Choose(Request{BuildID: "build-0", Image: "centos/RHEL6:1"}, down("spare"))
	if err != nil {
		t.Fatal(err)
	}
	want := Decision{
		Target: "runc",
		Rule:   RuleWeighted,
		Explanation: []string{
			`target "kata": excluded, image matches "rhel6"`,
			`target "runc": eligible, weight 90`,
			`target "spare": unavailable (breaker open)`,
			`target "local": eligible, weight 0 (pinned or default traffic only)`,
			fmt.Sprintf(`weighted choice among runc (90): hash of build id "build-0" mod 90 = %d, chose "runc" (rule weighted)`, hashID("build-0")%90),
		},
	}
	if diff := cmp.Diff(want, d); diff != "" {
		t.Errorf("Choose(%q) mismatch (-want +got):\n%s", "centos/RHEL6:1", diff)
	}
}

func TestRejectionError(t *testing.T) {
	tab := mustTable(t, []Target{{Name: "a", Weight: 1}}, "")
	_, err := tab.Choose(Request{BuildID: "x", Image: "img", Pin: "b"}, nil)
	const want = `unknown_target: pinned target "b" does not exist (targets: a)`
	if err == nil || err.Error() != want {
		t.Errorf("Choose(pin b) error = %v, want %q", err, want)
	}
	tab = mustTable(t, []Target{{Name: "a", Weight: 1}}, "")
	_, err = tab.Choose(Request{BuildID: "x", Image: "img", Pin: "a"}, down("a"))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), `pinned target "a"`) {
		t.Errorf("Choose(pin a, a down) error = %v, want ErrUnavailable naming the target", err)
	}
}

func TestChooseNilAvailability(t *testing.T) {
	tab := mustTable(t, []Target{{Name: "a", Weight: 1}}, "")
	d, err := tab.Choose(Request{BuildID: "x", Image: "img"}, nil)
	if err != nil || d.Target != "a" {
		t.Errorf("Choose(%q) = %q, %v, want %q", "img", d.Target, err, "a")
	}
}

// ids returns the build ids the statistical tests route: sequential ones, which stress a
// hash whose low bits are weak, and random-looking ones like UUIDs.
func ids() map[string][]string {
	const n = 10_000
	seq := make([]string, n)
	random := make([]string, n)
	rng := rand.New(rand.NewPCG(1, 2)) // fixed seed: the test is reproducible
	for i := range n {
		seq[i] = fmt.Sprintf("build-%d", i)
		random[i] = fmt.Sprintf("%08x-%04x-%04x", rng.Uint32(), rng.Uint32()&0xffff, rng.Uint32()&0xffff)
	}
	return map[string][]string{"sequential": seq, "random": random}
}

func TestWeightedProportions(t *testing.T) {
	tests := []struct {
		name    string
		weights []int
	}{
		{"kata 10 runc 90", []int{10, 90}},
		{"1 2 7", []int{1, 2, 7}},
		{"equal", []int{1, 1, 1, 1}},
	}
	for _, tc := range tests {
		var targets []Target
		total := 0
		for i, w := range tc.weights {
			targets = append(targets, Target{Name: fmt.Sprintf("t%d", i), Weight: w})
			total += w
		}
		tab := mustTable(t, targets, "")
		for kind, ids := range ids() {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				counts := map[string]int{}
				for _, id := range ids {
					d, err := tab.Choose(Request{BuildID: id, Image: "img"}, nil)
					if err != nil {
						t.Fatalf("Choose(%q): %v", id, err)
					}
					counts[d.Target]++
				}
				n := float64(len(ids))
				for _, tg := range targets {
					p := float64(tg.Weight) / float64(total)
					// Each id lands on the target with probability p if the hash is
					// uniform, so the count is binomial. 4.5 standard deviations: a
					// biased hash fails, a good one essentially never does (p < 1e-5),
					// and the ids are fixed, so the outcome is reproducible anyway.
					mean, sd := n*p, math.Sqrt(n*p*(1-p))
					if got := float64(counts[tg.Name]); math.Abs(got-mean) > 4.5*sd {
						t.Errorf("target %s (weight %d of %d) got %v of %v builds, want %.0f ± %.0f",
							tg.Name, tg.Weight, total, got, n, mean, 4.5*sd)
					}
				}
			})
		}
	}
}

func TestDeterministic(t *testing.T) {
	build := func() []Target {
		return []Target{
			{Name: "kata", Weight: 10, Isolated: true},
			{Name: "runc", Weight: 90},
			{Name: "gpu", Weight: 3},
		}
	}
	a := mustTable(t, build(), "")
	b := mustTable(t, build(), "")
	for _, id := range ids()["random"][:2000] {
		req := Request{BuildID: id, Image: "img"}
		first, err := a.Choose(req, nil)
		if err != nil {
			t.Fatalf("Choose(%q): %v", id, err)
		}
		for range 3 {
			if d, _ := a.Choose(req, nil); d.Target != first.Target {
				t.Fatalf("Choose(%q) = %q, want %q (same table, repeated call)", id, d.Target, first.Target)
			}
		}
		if d, _ := b.Choose(req, nil); d.Target != first.Target {
			t.Fatalf("Choose(%q) = %q, want %q (second table from the same targets)", id, d.Target, first.Target)
		}
	}
}

// TestHashStable pins hashID: it decides where redelivered builds go, so it must give the same
// values in every process and every release.
func TestHashStable(t *testing.T) {
	for _, id := range []string{"", "build-0", "0f8fad5b-d9cb-469f-a165-70867728950e"} {
		h := fnv.New64a()
		h.Write([]byte(id))
		x := h.Sum64()
		x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
		x = (x ^ x>>27) * 0x94d049bb133111eb
		x ^= x >> 31
		if got := hashID(id); got != x {
			t.Errorf("hashID(%q) = %#x, want FNV-1a+splitmix64 %#x", id, got, x)
		}
	}
	const want = 0x0a4ffb8b71100f78
	if got := hashID("build-0"); got != want {
		t.Errorf("hashID(%q) = %#x, want %#x: changing the hash moves redelivered builds", "build-0", got, uint64(want))
	}
}

func TestNewTable(t *testing.T) {
	tests := []struct {
		name    string
		targets []Target
		def     string
		wantErr string // "" = valid
	}{
		{"valid", []Target{{Name: "a", Weight: 1}, {Name: "b"}}, "b", ""},
		{"no default", []Target{{Name: "a", Weight: 1}}, "", ""},
		{"all weight 0 is allowed", []Target{{Name: "a"}}, "", ""},
		{"no targets", nil, "", "at least one target"},
		{"empty name", []Target{{Name: ""}}, "", "target 0: name is empty"},
		{"duplicate name", []Target{{Name: "a"}, {Name: "a"}}, "", `target "a": name is used twice`},
		{"negative weight", []Target{{Name: "a", Weight: -1}}, "", `target "a": weight must be >= 0 (got -1)`},
		{"unknown default", []Target{{Name: "a"}}, "b", `default target "b" is not a target`},
		{"nil pattern", []Target{{Name: "a", Exclude: []*regexp.Regexp{nil}}}, "", `exclude[0] is nil`},
		{"weights overflow", []Target{{Name: "a", Weight: math.MaxInt32}, {Name: "b", Weight: 1}}, "", "weights add up to"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tab, err := NewTable(tc.targets, tc.def)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("NewTable() = %v, want no error", err)
			case tc.wantErr == "":
				if diff := cmp.Diff(tc.targets, tab.Targets(), cmp.Comparer(func(a, b *regexp.Regexp) bool {
					return a.String() == b.String()
				})); diff != "" {
					t.Errorf("Targets() mismatch (-want +got):\n%s", diff)
				}
				if tab.Default() != tc.def {
					t.Errorf("Default() = %q, want %q", tab.Default(), tc.def)
				}
			case err == nil || !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("NewTable() = %v, want error containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestNewTableJoinsErrors(t *testing.T) {
	_, err := NewTable([]Target{{Name: "a", Weight: -1}, {Name: "a"}}, "z")
	if err == nil {
		t.Fatal("NewTable() = nil, want errors")
	}
	for _, want := range []string{"weight must be >= 0", "used twice", `default target "z"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("NewTable() = %v, want it to contain %q", err, want)
		}
	}
}

func TestTableIsImmutable(t *testing.T) {
	targets := []Target{{Name: "a", Weight: 1, Exclude: excludes(t, "x")}}
	tab := mustTable(t, targets, "")
	targets[0].Name = "changed"
	targets[0].Exclude[0] = regexp.MustCompile("img")
	got := tab.Targets()
	got[0].Weight = 0
	got[0].Exclude[0] = regexp.MustCompile("img")
	d, err := tab.Choose(Request{BuildID: "id", Image: "img"}, nil)
	if err != nil || d.Target != "a" {
		t.Errorf("Choose(%q) = %q, %v, want %q: the table changed with its caller's slices", "img", d.Target, err, "a")
	}
}

func TestCompileExcludes(t *testing.T) {
	res, err := CompileExcludes([]string{"rhel6", `^docker\.io/`})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		image string
		want  bool
	}{
		{"registry.example.com/RHEL6:1", true},
		{"Docker.IO/library/alpine", true},
		{"quay.io/docker.io/x", false},
		{"alpine", false},
	} {
		got := slices.ContainsFunc(res, func(re *regexp.Regexp) bool { return re.MatchString(tc.image) })
		if got != tc.want {
			t.Errorf("excluded(%q) = %v, want %v", tc.image, got, tc.want)
		}
	}

	_, err = CompileExcludes([]string{"ok", "bad(", "", "[z-a]"})
	if err == nil {
		t.Fatal("CompileExcludes(bad patterns) = nil error")
	}
	for _, want := range []string{`"bad("`, `""`, `"[z-a]"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("CompileExcludes error %q does not name pattern %s", err, want)
		}
	}
	if strings.Contains(err.Error(), `"ok"`) {
		t.Errorf("CompileExcludes error %q names a good pattern", err)
	}
}

func BenchmarkChoose(b *testing.B) {
	tab := mustTable(b, []Target{
		{Name: "kata", Weight: 10, Isolated: true, Exclude: excludes(b, "rhel6", `^docker\.io/legacy/`)},
		{Name: "runc", Weight: 90, Exclude: excludes(b, "untrusted")},
		{Name: "local", Weight: 0},
	}, "local")
	ids := ids()["random"]
	unavailable := down("gpu")
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, err := tab.Choose(Request{BuildID: ids[i%len(ids)], Image: "registry.example.com/team/app:1.2.3"}, unavailable); err != nil {
			b.Fatal(err)
		}
	}
}
