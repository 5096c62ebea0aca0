package config

import (
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"sigs.k8s.io/yaml"

	"github.com/buildfleet/buildfleet/internal/fair"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func loadGood(t *testing.T, name string) Targets {
	t.Helper()
	tg, err := LoadTargets(filepath.Join("testdata", name))
	if err != nil {
		t.Fatalf("LoadTargets(%q) = %v", name, err)
	}
	return tg
}

func TestLoadTargetsGood(t *testing.T) {
	tests := []struct {
		file string
		want Targets
	}{
		{
			file: "good.yaml",
			want: Targets{
				Default: "local",
				Targets: []TargetSpec{
					{
						Name: "kata", Executor: ExecutorKubernetes, Weight: 10, Isolated: true, MaxRunning: 200,
						Exclude:    []string{"rhel6", `^docker\.io/legacy/`},
						Timeout:    TimeoutSpec{Default: Duration(30 * time.Minute), Max: Duration(2 * time.Hour)},
						Kubernetes: json.RawMessage(`{"namespace":"builds","runtime_class":"kata"}`),
					},
					{
						Name: "runc", Executor: ExecutorKubernetes, Weight: 90,
						Exclude:    []string{"untrusted"},
						Kubernetes: json.RawMessage(`{"namespace":"builds"}`),
					},
					{
						Name: "local", Executor: ExecutorProcess, Weight: 0,
						Timeout: TimeoutSpec{Max: Duration(90 * time.Minute)},
						Process: &ProcessSpec{KeepScratch: true},
					},
				},
				Policy: PolicySpec{Isolate: []IsolationRuleSpec{
					{Name: "untrusted", Annotations: map[string]string{"buildfleet.io/trust": "untrusted"}},
					{Name: "forks", Pipeline: "github.com/*/fork-*"},
					{Name: "pull-requests", Job: "pull request *", Annotations: map[string]string{"buildfleet.io/source": "*"}},
				}, Tenants: TenantsSpec{
					From:     []string{"annotation:buildfleet.io/tenant", "pipeline-owner"},
					Fallback: "shared",
					Default:  TenantLimitsSpec{Weight: 1, Cap: 100},
					Limits:   []TenantLimitsSpec{{Name: "payments", Weight: 3, Cap: 300, MaxPriority: 10}, {Name: "docs"}},
				}},
			},
		},
		{
			file: "good-minimal.yaml",
			want: Targets{Targets: []TargetSpec{{Name: "local", Executor: ExecutorProcess, Weight: 1}}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			got := loadGood(t, tc.file)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("LoadTargets(%q) mismatch (-want +got):\n%s", tc.file, diff)
			}
			// What the file says survives a round trip through YAML, so `buildfleet
			// config` can print the table it runs with.
			out, err := yaml.Marshal(got)
			if err != nil {
				t.Fatalf("yaml.Marshal: %v", err)
			}
			again, err := ParseTargets(out, "printed")
			if err != nil {
				t.Fatalf("ParseTargets(printed %s) = %v\n%s", tc.file, err, out)
			}
			if diff := cmp.Diff(got, again); diff != "" {
				t.Errorf("round trip of %q mismatch (-want +got):\n%s", tc.file, diff)
			}
		})
	}
}

func TestLoadTargetsBad(t *testing.T) {
	tests := []struct {
		file string
		want []string // each must appear in the error, each on a line that names the file
	}{
		{"bad-weight.yaml", []string{"bad-weight.yaml: targets[1].weight: must be >= 0 (got -1)"}},
		{"bad-unknown-field.yaml", []string{"bad-unknown-field.yaml: targets[1].wieght: unknown field (known: name, executor, weight,"}},
		{"bad-unknown-nested.yaml", []string{"targets[0].timeout.maximum: unknown field (known: default, max)"}},
		{"bad-unknown-top.yaml", []string{"bad-unknown-top.yaml: defaults: unknown field (known: default, targets, policy)"}},
		{"bad-duration.yaml", []string{`targets[0].timeout.max: must be a duration such as 30m or 2h (got "2 hours")`}},
		{"bad-duration-number.yaml", []string{`targets[0].timeout.default: must be a duration such as 30m or 2h (got 30)`}},
		{"bad-type.yaml", []string{`targets[1].weight: must be an integer (got "ten")`}},
		{"bad-exclude.yaml", []string{
			`targets[0].exclude[1]: exclude pattern "rhel(7"`,
			`targets[0].exclude[2]: exclude pattern ""`,
		}},
		{"bad-names.yaml", []string{
			`default: "missing" is not the name of a target`,
			`targets[1].name: must match ^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$ (got "Kata_2")`,
			`targets[2].name: "kata" is already the name of targets[0]`,
			`targets[3].name: required`,
		}},
		{"bad-executor.yaml", []string{
			`targets[0].executor: must be process or kubernetes (got "docker")`,
			`targets[1].executor: required: process or kubernetes`,
		}},
		{"bad-timeout.yaml", []string{
			`targets[0].timeout.default: must not exceed timeout.max (got 3h0m0s, max 2h0m0s)`,
			`targets[1].timeout.default: must not be negative (got -1m0s)`,
		}},
		{"bad-options.yaml", []string{
			`targets[0].process: only valid with executor process`,
			`targets[1].kubernetes: only valid with executor kubernetes`,
		}},
		{"bad-policy.yaml", []string{
			`policy.isolate[0].name: required`,
			`policy.isolate[0].annotations["buildfleet.io/trust"]: is empty; "*" matches any value`,
			`policy.isolate[1]: sets no condition (annotations, pipeline, job, image), so it would match every build`,
			`policy.isolate[2].name: "all" is already the name of policy.isolate[1]`,
			`policy.isolate[2]: no target is isolated, so every build this rule matches would be rejected`,
			`targets[0].max_running: must be >= 0 (got -1)`,
			`policy.tenants.from[0]: "owner" is not a tenant source: want "pipeline-owner" or "annotation:<key>"`,
			`policy.tenants.from[1]: "annotation:" is not a tenant source`,
			`policy.tenants.fallback: "bad name" is not a tenant name`,
			`policy.tenants.default.name: a default names no tenant`,
			`policy.tenants.default.weight: must be between 1 and 1000000, or left out for 1 (got -1)`,
			`policy.tenants.limits[0].name: required`,
			`policy.tenants.limits[1].cap: must not be negative (got -1)`,
			`policy.tenants.limits[1].max_priority: must be between 0 and 100 (got 101)`,
			`policy.tenants.limits[2].name: "a" is already the name of policy.tenants.limits[1]`,
			`policy.tenants.limits[2].weight: must be between 1 and 1000000, or left out for 1 (got 2000000)`,
			`policy.tenants.limits[3].name: "b/c" is not a tenant name`,
		}},
		{"bad-empty.yaml", []string{"bad-empty.yaml: targets: at least one target is required"}},
		{"bad-no-traffic.yaml", []string{"targets: every target has weight 0 and there is no default"}},
		{"bad-syntax.yaml", []string{"bad-syntax.yaml: yaml: line 3: found a tab character"}},
		{"bad-duplicate-key.yaml", []string{`bad-duplicate-key.yaml: yaml: unmarshal errors:`, `key "weight" already set in map`}},
		{"bad-top-level-list.yaml", []string{"bad-top-level-list.yaml: must be a mapping (got a list)"}},
		{"bad-targets-mapping.yaml", []string{"bad-targets-mapping.yaml: targets: must be a list (got a mapping)"}},
		{"bad-weight-overflow.yaml", []string{"bad-weight-overflow.yaml: routing table: weights add up to 4000000000"}},
		{"does-not-exist.yaml", []string{"does-not-exist.yaml: no such file or directory"}},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			_, err := LoadTargets(filepath.Join("testdata", tc.file))
			if err == nil {
				t.Fatalf("LoadTargets(%q) = nil error, want %q", tc.file, tc.want)
			}
			msg := err.Error()
			for _, want := range tc.want {
				if !strings.Contains(msg, want) {
					t.Errorf("LoadTargets(%q) = %q, want it to contain %q", tc.file, msg, want)
				}
			}
			lines := strings.Split(msg, "\n")
			for _, line := range lines {
				if !strings.Contains(line, tc.file) && !strings.HasPrefix(line, "  ") {
					t.Errorf("LoadTargets(%q): error line %q does not name the file", tc.file, line)
				}
			}
		})
	}
}

func TestDefaultTargets(t *testing.T) {
	d := DefaultTargets()
	if err := d.Validate(); err != nil {
		t.Fatalf("DefaultTargets().Validate() = %v", err)
	}
	tab, err := d.Table()
	if err != nil {
		t.Fatalf("DefaultTargets().Table() = %v", err)
	}
	got, err := tab.Choose(routing.Request{BuildID: "b1", Image: "alpine"}, nil)
	if err != nil || got.Target != "local" {
		t.Errorf("Choose(%q) = %q, %v, want %q", "alpine", got.Target, err, "local")
	}
}

func TestTableRoutesPinnedBuild(t *testing.T) {
	tab, err := loadGood(t, "good.yaml").Table()
	if err != nil {
		t.Fatalf("Table() = %v", err)
	}
	tests := []struct {
		image, pin string
		want       string
		wantReason protocol.Reason
	}{
		{image: "golang:1.26", pin: "local", want: "local"},
		{image: "golang:1.26", pin: "kata", want: "kata"},
		// Exclusions compiled from the file are case-insensitive and unanchored.
		{image: "registry.example.com/RHEL6:1", pin: "kata", wantReason: protocol.ReasonExcludedImage},
		{image: "golang:1.26", pin: "gpu", wantReason: protocol.ReasonUnknownTarget},
	}
	for _, tc := range tests {
		d, err := tab.Choose(routing.Request{BuildID: "build-1", Image: tc.image, Pin: tc.pin}, nil)
		var rej *routing.Rejection
		switch {
		case tc.wantReason != "":
			if !errors.As(err, &rej) || rej.Reason != tc.wantReason {
				t.Errorf("Choose(%q pinned to %q) = %q, %v, want rejection %s", tc.image, tc.pin, d.Target, err, tc.wantReason)
			}
		case err != nil || d.Target != tc.want || d.Rule != routing.RulePin:
			t.Errorf("Choose(%q pinned to %q) = %q by %q, %v, want %q by pin", tc.image, tc.pin, d.Target, d.Rule, err, tc.want)
		}
	}
	if diff := cmp.Diff([]string{"kata", "runc", "local"}, names(tab.Targets())); diff != "" {
		t.Errorf("Targets() order mismatch (-want +got):\n%s", diff)
	}
	if tab.Default() != "local" {
		t.Errorf("Default() = %q, want %q", tab.Default(), "local")
	}
}

func names(ts []routing.Target) []string {
	var out []string
	for _, t := range ts {
		out = append(out, t.Name)
	}
	return out
}

func TestTableRefusesInvalidTargets(t *testing.T) {
	bad := Targets{Targets: []TargetSpec{{Name: "a", Executor: ExecutorProcess, Weight: -1}}}
	if _, err := bad.Table(); err == nil || !strings.Contains(err.Error(), "targets[0].weight") {
		t.Errorf("Table() = %v, want an error naming targets[0].weight", err)
	}
}

func TestFind(t *testing.T) {
	tg := loadGood(t, "good.yaml")
	if ts, ok := tg.Find("runc"); !ok || ts.Weight != 90 {
		t.Errorf("Find(%q) = %+v, %v, want the runc target", "runc", ts, ok)
	}
	if _, ok := tg.Find("gpu"); ok {
		t.Errorf("Find(%q) found a target, want none", "gpu")
	}
}

func TestTimeouts(t *testing.T) {
	s := Settings{BuildTimeout: time.Hour, MaxBuildTimeout: 6 * time.Hour}
	tests := []struct {
		name             string
		spec             TimeoutSpec
		wantDef, wantMax time.Duration
	}{
		{"settings", TimeoutSpec{}, time.Hour, 6 * time.Hour},
		{"target sets both", TimeoutSpec{Default: Duration(30 * time.Minute), Max: Duration(2 * time.Hour)}, 30 * time.Minute, 2 * time.Hour},
		{"target sets default", TimeoutSpec{Default: Duration(2 * time.Hour)}, 2 * time.Hour, 6 * time.Hour},
		{"target lowers max below settings default", TimeoutSpec{Max: Duration(20 * time.Minute)}, 20 * time.Minute, 20 * time.Minute},
		{"target default above settings max", TimeoutSpec{Default: Duration(8 * time.Hour)}, 6 * time.Hour, 6 * time.Hour},
		{"target raises max", TimeoutSpec{Max: Duration(12 * time.Hour)}, time.Hour, 12 * time.Hour},
	}
	for _, tc := range tests {
		def, max := TargetSpec{Timeout: tc.spec}.Timeouts(s)
		if def != tc.wantDef || max != tc.wantMax {
			t.Errorf("%s: Timeouts() = %v, %v, want %v, %v", tc.name, def, max, tc.wantDef, tc.wantMax)
		}
	}
}

func TestDurationJSON(t *testing.T) {
	b, err := json.Marshal(TimeoutSpec{Default: Duration(90 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(b), `{"default":"1m30s"}`; got != want {
		t.Errorf("json.Marshal(TimeoutSpec) = %s, want %s", got, want)
	}
	var ts TimeoutSpec
	if err := json.Unmarshal([]byte(`{"default":"1m30s","max":null}`), &ts); err != nil {
		t.Fatal(err)
	}
	if ts.Default != Duration(90*time.Second) || ts.Max != 0 {
		t.Errorf("json.Unmarshal = %+v, want default 1m30s, no max", ts)
	}
}

// The tenant policy of the targets file is the fair-share policy the scheduler applies.
func TestFairPolicy(t *testing.T) {
	p := loadGood(t, "good.yaml").FairPolicy()
	req := protocol.BuildRequest{Pipeline: "github.com/acme/web", Annotations: map[string]string{protocol.AnnotationPriority: "50"}}
	if got := p.Tenant(req); got != "acme" {
		t.Errorf("tenant of an acme pipeline = %q", got)
	}
	req.Annotations[protocol.AnnotationTenant] = "payments"
	if got := p.Tenant(req); got != "payments" {
		t.Errorf("tenant named by annotation = %q", got)
	}
	if got := p.Tenant(protocol.BuildRequest{}); got != "shared" {
		t.Errorf("tenant of a build nothing names = %q, want the fallback", got)
	}
	if prio, asked, err := p.Priority(req, "payments"); err != nil || prio != 10 || asked != 50 {
		t.Errorf("payments priority = %d (asked %d), %v; want 10, capped by its max_priority", prio, asked, err)
	}
	for tenant, want := range map[string]fair.Limits{
		"payments": {Weight: 3, Cap: 300, MaxPriority: 10},
		"docs":     {Weight: 1},
		"acme":     {Weight: 1, Cap: 100},
	} {
		if got := p.Limits(tenant); got != want {
			t.Errorf("limits of %s = %+v, want %+v", tenant, got, want)
		}
	}
	if got := DefaultTargets().FairPolicy().Tenant(protocol.BuildRequest{Pipeline: "acme/web"}); got != fair.DefaultTenant {
		t.Errorf("without a tenant policy every build is in %q, got %q", fair.DefaultTenant, got)
	}
}
