package fair

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func TestTenant(t *testing.T) {
	p := &Policy{From: []Source{{Annotation: protocol.AnnotationTenant}, {PipelineOwner: true}}, Fallback: "shared"}
	tests := []struct {
		name        string
		annotations map[string]string
		pipeline    string
		want        string
	}{
		{"annotation first", map[string]string{protocol.AnnotationTenant: "payments"}, "github.com/acme/web", "payments"},
		{"pipeline owner after a host", nil, "github.com/acme/web", "acme"},
		{"pipeline owner without a host", nil, "acme/web", "acme"},
		{"a one-segment pipeline is its own owner", nil, "web", "web"},
		{"a dotted first segment with nothing after it is no host", nil, "acme.io/web", "acme_io"},
		{"an empty annotation falls through", map[string]string{protocol.AnnotationTenant: ""}, "acme/web", "acme"},
		{"nothing names it: the fallback", nil, "", "shared"},
		{"unsafe characters become _", map[string]string{protocol.AnnotationTenant: "team a.b/c*"}, "", "team_a_b_c_"},
		{"a leading _ or - is dropped", map[string]string{protocol.AnnotationTenant: "--x"}, "", "x"},
		{"only unsafe characters: falls through", map[string]string{protocol.AnnotationTenant: "__"}, "acme/web", "acme"},
		{"too long is cut", map[string]string{protocol.AnnotationTenant: strings.Repeat("a", 80)}, "", strings.Repeat("a", MaxTenantLength)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := p.Tenant(protocol.BuildRequest{Annotations: tc.annotations, Pipeline: tc.pipeline})
			if got != tc.want {
				t.Errorf("Tenant = %q, want %q", got, tc.want)
			}
		})
	}
	if got := (&Policy{}).Tenant(protocol.BuildRequest{Pipeline: "acme/web"}); got != DefaultTenant {
		t.Errorf("the zero policy's tenant = %q, want %q", got, DefaultTenant)
	}
}

func TestPriority(t *testing.T) {
	p := &Policy{Default: Limits{Weight: 1, MaxPriority: 0}, Tenants: map[string]Limits{"vip": {Weight: 1, MaxPriority: 10}}}
	tests := []struct {
		tenant, value   string
		set             bool
		prio, asked     int
		wantErrContains string
	}{
		{tenant: "vip", set: false, prio: 0, asked: 0},
		{tenant: "vip", value: "7", set: true, prio: 7, asked: 7},
		{tenant: "vip", value: "50", set: true, prio: 10, asked: 50},
		{tenant: "other", value: "5", set: true, prio: 0, asked: 5},
		{tenant: "vip", value: "x", set: true, wantErrContains: "not an integer"},
		{tenant: "vip", value: "101", set: true, wantErrContains: "from 0 to 100"},
		{tenant: "vip", value: "-1", set: true, wantErrContains: "from 0 to 100"},
		{tenant: "vip", value: "07", set: true, wantErrContains: "not an integer"},
	}
	for _, tc := range tests {
		t.Run(tc.tenant+"="+tc.value, func(t *testing.T) {
			req := protocol.BuildRequest{}
			if tc.set {
				req.Annotations = map[string]string{protocol.AnnotationPriority: tc.value}
			}
			prio, asked, err := p.Priority(req, tc.tenant)
			if tc.wantErrContains != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErrContains) {
					t.Fatalf("err = %v, want one saying %q", err, tc.wantErrContains)
				}
				return
			}
			if err != nil || prio != tc.prio || asked != tc.asked {
				t.Errorf("Priority = %d, %d, %v; want %d, %d", prio, asked, err, tc.prio, tc.asked)
			}
		})
	}
}

func TestParseSource(t *testing.T) {
	for in, want := range map[string]Source{"pipeline-owner": {PipelineOwner: true}, "annotation:a/b": {Annotation: "a/b"}} {
		got, err := ParseSource(in)
		if err != nil || got != want || got.String() != in {
			t.Errorf("ParseSource(%q) = %+v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "annotation:", "owner", "label:x"} {
		if _, err := ParseSource(bad); err == nil {
			t.Errorf("ParseSource(%q) = nil error", bad)
		}
	}
}

// order drains q with the given running counts and room, starting every build that start
// allows, and returns the ids in the order they were admitted.
func order(q *Queue, limits map[string]Limits, running map[string]int, room int, start func(Build) (string, bool)) []string {
	if start == nil {
		start = func(Build) (string, bool) { return "t", true }
	}
	lim := func(tenant string) Limits {
		if l, ok := limits[tenant]; ok {
			return l
		}
		return Limits{Weight: 1}
	}
	r := q.Round(Usage{Running: running, Limits: lim}, start)
	var out []string
	for len(out) < room {
		b, _, ok := r.Next()
		if !ok {
			break
		}
		out = append(out, b.ID)
	}
	return out
}

// fill adds n builds of tenant, seq from first on, priority prio.
func fill(q *Queue, tenant string, n int, first uint64, prio int) {
	for i := range n {
		q.Add(Build{ID: fmt.Sprintf("%s-%d", tenant, i), Tenant: tenant, Priority: prio, Seq: first + uint64(i)})
	}
}

func TestNext(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(q *Queue)
		limits  map[string]Limits
		running map[string]int
		room    int
		start   func(Build) (string, bool)
		want    []string
	}{
		{
			name:  "one tenant is first come first served",
			setup: func(q *Queue) { fill(q, "a", 3, 1, 0) },
			room:  10, want: []string{"a-0", "a-1", "a-2"},
		},
		{
			name: "a late small tenant goes before a big one's backlog",
			setup: func(q *Queue) {
				fill(q, "a", 100, 1, 0)
				fill(q, "b", 2, 1000, 0)
			},
			running: map[string]int{"a": 200},
			room:    3, want: []string{"b-0", "b-1", "a-0"},
		},
		{
			name: "equal tenants alternate, the older candidate first on a tie",
			setup: func(q *Queue) {
				fill(q, "a", 3, 1, 0)
				fill(q, "b", 3, 10, 0)
			},
			room: 4, want: []string{"a-0", "b-0", "a-1", "b-1"},
		},
		{
			name: "weights: 3 to 1",
			setup: func(q *Queue) {
				fill(q, "a", 10, 1, 0)
				fill(q, "b", 10, 100, 0)
			},
			limits: map[string]Limits{"a": {Weight: 3}},
			room:   8, want: []string{"a-0", "b-0", "a-1", "a-2", "a-3", "b-1", "a-4", "a-5"},
		},
		{
			name: "a tenant at its cap waits; the others go",
			setup: func(q *Queue) {
				fill(q, "a", 5, 1, 0)
				fill(q, "b", 5, 100, 0)
			},
			limits:  map[string]Limits{"a": {Weight: 1, Cap: 2}},
			running: map[string]int{"a": 1, "b": 5},
			room:    4, want: []string{"a-0", "b-0", "b-1", "b-2"},
		},
		{
			name:    "everyone at the cap: nothing starts",
			setup:   func(q *Queue) { fill(q, "a", 5, 1, 0) },
			limits:  map[string]Limits{"a": {Weight: 1, Cap: 2}},
			running: map[string]int{"a": 2},
			room:    4, want: nil,
		},
		{
			name: "priority orders within a tenant, not across",
			setup: func(q *Queue) {
				fill(q, "a", 2, 1, 0)
				q.Add(Build{ID: "a-urgent", Tenant: "a", Priority: 9, Seq: 50})
				q.Add(Build{ID: "b-low", Tenant: "b", Priority: 0, Seq: 60})
			},
			running: map[string]int{"a": 1},
			room:    4, want: []string{"b-low", "a-urgent", "a-0", "a-1"},
		},
		{
			name: "a build that cannot start now is passed over for the tenant's next",
			setup: func(q *Queue) {
				q.Add(Build{ID: "a-pinned", Tenant: "a", Seq: 1})
				q.Add(Build{ID: "a-free", Tenant: "a", Seq: 2})
				q.Add(Build{ID: "b-pinned", Tenant: "b", Seq: 3})
			},
			start: func(b Build) (string, bool) { return "t", !strings.HasSuffix(b.ID, "pinned") },
			room:  5, want: []string{"a-free"},
		},
		{
			name: "a tenant with nothing that can start does not hold up the others",
			setup: func(q *Queue) {
				fill(q, "a", 3, 1, 0)
				fill(q, "b", 2, 10, 0)
			},
			start: func(b Build) (string, bool) { return "t", b.Tenant == "b" },
			room:  5, want: []string{"b-0", "b-1"},
		},
		{
			name:  "room bounds the round",
			setup: func(q *Queue) { fill(q, "a", 5, 1, 0) },
			room:  2, want: []string{"a-0", "a-1"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := NewQueue()
			tc.setup(q)
			before := q.Len()
			running := tc.running
			if running == nil {
				running = map[string]int{}
			}
			got := order(q, tc.limits, running, tc.room, tc.start)
			if !slices.Equal(got, tc.want) {
				t.Errorf("admitted %v, want %v", got, tc.want)
			}
			if q.Len() != before-len(got) {
				t.Errorf("%d left waiting, want %d", q.Len(), before-len(got))
			}
			for _, id := range got {
				if q.Has(id) {
					t.Errorf("%s admitted but still waiting", id)
				}
			}
		})
	}
}

// The start function sees the round's own admissions: a target that fills up during a
// round takes no more, and a build blocked by it is not asked about again in that round.
func TestNextSeesTheRoundFillTargets(t *testing.T) {
	q := NewQueue()
	fill(q, "a", 4, 1, 0)
	fill(q, "b", 4, 10, 0)
	running := map[string]int{} // on target "east", capped at 3
	asked := map[string]int{}
	start := func(b Build) (string, bool) {
		asked[b.ID]++
		if running["east"] >= 3 {
			return "", false
		}
		return "east", true
	}
	r := q.Round(Usage{Running: map[string]int{}, Limits: func(string) Limits { return Limits{Weight: 1} }}, start)
	var got []string
	for {
		b, target, ok := r.Next()
		if !ok {
			break
		}
		running[target]++
		got = append(got, b.ID)
	}
	if want := []string{"a-0", "b-0", "a-1"}; !slices.Equal(got, want) {
		t.Errorf("admitted %v, want %v", got, want)
	}
	for id, n := range asked {
		if n > 3 {
			t.Errorf("%s was asked about %d times in one round", id, n)
		}
	}
}

func TestAddIsIdempotentAndRemoveForgets(t *testing.T) {
	q := NewQueue()
	q.Add(Build{ID: "x", Tenant: "a", Seq: 1})
	q.Add(Build{ID: "x", Tenant: "a", Seq: 1})
	if q.Len() != 1 {
		t.Fatalf("Len = %d after adding one build twice", q.Len())
	}
	if !q.Remove("x") || q.Remove("x") || q.Len() != 0 || len(q.View(5)) != 0 {
		t.Fatalf("Remove did not forget the build: len %d, view %v", q.Len(), q.View(5))
	}
}

func TestView(t *testing.T) {
	q := NewQueue()
	fill(q, "small", 2, 100, 0)
	fill(q, "big", 5, 1, 0)
	q.Add(Build{ID: "big-urgent", Tenant: "big", Priority: 3, Seq: 200})
	v := q.View(2)
	if len(v) != 2 || v[0].Tenant != "big" || v[0].Waiting != 6 || v[1].Tenant != "small" || v[1].Waiting != 2 {
		t.Fatalf("View = %+v", v)
	}
	if ids := []string{v[0].Head[0].ID, v[0].Head[1].ID}; !slices.Equal(ids, []string{"big-urgent", "big-0"}) {
		t.Errorf("big's head = %v, want the urgent build then the oldest", ids)
	}
}

// BenchmarkRound measures one full round over a deep queue: 5,000 builds of one tenant and
// 50 of another, 200 admitted.
func BenchmarkRound(b *testing.B) {
	for b.Loop() {
		b.StopTimer()
		q := NewQueue()
		fill(q, "a", 5000, 1, 0)
		fill(q, "b", 50, 6000, 0)
		b.StartTimer()
		order(q, nil, map[string]int{}, 200, nil)
	}
}
