package routing

import (
	"regexp"
	"strings"
	"testing"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func glob(t *testing.T, p string) *regexp.Regexp {
	t.Helper()
	re, err := CompileGlob(p)
	if err != nil {
		t.Fatal(err)
	}
	return re
}

func TestCompileGlob(t *testing.T) {
	for _, tc := range []struct {
		pattern, value string
		want           bool
	}{
		{"org/*", "org/app", true},
		{"org/*", "org/team/app", true}, // * crosses slashes
		{"org/*", "other/org/app", false},
		{"github.com/*/fork-*", "github.com/alice/fork-app", true},
		{"pull request ?", "pull request 7", true},
		{"pull request ?", "pull request 12", false},
		{"a.b", "axb", false}, // everything else is literal
		{"[x]", "[x]", true},
		{"*", "", true},
		{"untrusted", "Untrusted", false}, // case matters
	} {
		if got := glob(t, tc.pattern).MatchString(tc.value); got != tc.want {
			t.Errorf("CompileGlob(%q).MatchString(%q) = %v, want %v", tc.pattern, tc.value, got, tc.want)
		}
	}
	if _, err := CompileGlob(""); err == nil {
		t.Error("CompileGlob(\"\") = nil error, want one")
	}
}

// TestIsolationPolicy: a build a rule matches runs only on an isolated target, through a
// pin and through the default; a build no rule matches is routed as before; leaving an
// annotation out does not lift a rule on the pipeline.
func TestIsolationPolicy(t *testing.T) {
	targets := []Target{{Name: "kata", Weight: 1, Isolated: true}, {Name: "runc", Weight: 0}, {Name: "local", Weight: 0}}
	rules := []IsolationRule{
		{Name: "untrusted", Annotations: map[string]*regexp.Regexp{"buildfleet.io/trust": glob(t, "untrusted")}},
		{Name: "forks", Pipeline: glob(t, "github.com/*/fork-*")},
		{Name: "pr-from-outside", Job: glob(t, "pull request *"), Annotations: map[string]*regexp.Regexp{"buildfleet.io/source": glob(t, "*")}},
	}
	tab, err := NewTable(targets, "runc", rules...)
	if err != nil {
		t.Fatal(err)
	}
	noKata, err := NewTable([]Target{{Name: "kata", Weight: 0, Isolated: true}, {Name: "runc", Weight: 1}}, "runc", rules...)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		tab       *Table
		req       Request
		want      string // target, or "rejected"
		isolation string // the rule named
	}{
		{"untrusted annotation, weighted", tab, Request{BuildID: "a", Annotations: map[string]string{"buildfleet.io/trust": "untrusted"}}, "kata", "untrusted"},
		{"untrusted annotation, pinned to runc", tab, Request{BuildID: "a", Pin: "runc", Annotations: map[string]string{"buildfleet.io/trust": "untrusted"}}, "rejected", "untrusted"},
		{"untrusted annotation, pinned to kata", tab, Request{BuildID: "a", Pin: "kata", Annotations: map[string]string{"buildfleet.io/trust": "untrusted"}}, "kata", "untrusted"},
		{"trusted annotation", tab, Request{BuildID: "a", Pin: "runc", Annotations: map[string]string{"buildfleet.io/trust": "trusted"}}, "runc", ""},
		{"fork pipeline without any annotation", tab, Request{BuildID: "a", Pin: "runc", Pipeline: "github.com/bob/fork-app"}, "rejected", "forks"},
		{"fork pipeline claiming trust", tab, Request{BuildID: "a", Pipeline: "github.com/bob/fork-app", Annotations: map[string]string{"buildfleet.io/trust": "trusted"}}, "kata", "forks"},
		{"pull request from outside", tab, Request{BuildID: "a", Pin: "local", Job: "pull request 12", Annotations: map[string]string{"buildfleet.io/source": "fork"}}, "rejected", "pr-from-outside"},
		{"pull request, condition unmet", tab, Request{BuildID: "a", Pin: "local", Job: "pull request 12"}, "local", ""},
		{"required by the request", tab, Request{BuildID: "a", Pin: "runc", RequireIsolation: true}, "rejected", ""},
		// kata has weight 0 (pinned or default traffic only) and runc is the default: a build
		// that must be isolated and is not pinned to kata has nowhere to go.
		{"no isolated target with weight", noKata, Request{BuildID: "a", Pipeline: "github.com/bob/fork-x"}, "rejected", "forks"},
		{"no rule, default traffic", noKata, Request{BuildID: "a", Pipeline: "org/app"}, "runc", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dec, err := tc.tab.Choose(tc.req, nil)
			got := dec.Target
			var rej *Rejection
			if err != nil {
				if !asRejection(err, &rej) || rej.Reason != protocol.ReasonNoEligible {
					t.Fatalf("Choose = %v; want a target or a no_eligible_target rejection", err)
				}
				got = "rejected"
				if tc.isolation != "" && !strings.Contains(rej.Message, `policy "`+tc.isolation+`"`) {
					t.Errorf("rejection %q does not name policy %q", rej.Message, tc.isolation)
				}
			}
			if got != tc.want {
				t.Fatalf("Choose(%+v) = %s (%v); want %s\n%s", tc.req, got, err, tc.want, strings.Join(dec.Explanation, "\n"))
			}
			if err == nil && dec.Isolation != tc.isolation {
				t.Errorf("Decision.Isolation = %q, want %q", dec.Isolation, tc.isolation)
			}
			if tc.isolation != "" && !strings.Contains(strings.Join(dec.Explanation, "\n"), `policy "`+tc.isolation+`" requires an isolated target`) {
				t.Errorf("the explanation does not say policy %q decided:\n%s", tc.isolation, strings.Join(dec.Explanation, "\n"))
			}
		})
	}
}

func asRejection(err error, rej **Rejection) bool {
	r, ok := err.(*Rejection)
	*rej = r
	return ok
}

func TestIsolationPolicyIsChecked(t *testing.T) {
	kata := Target{Name: "kata", Weight: 1, Isolated: true}
	for _, tc := range []struct {
		targets []Target
		rules   []IsolationRule
		want    string
	}{
		{[]Target{kata}, []IsolationRule{{Pipeline: glob(t, "x")}}, "isolation rule 0: name is empty"},
		{[]Target{kata}, []IsolationRule{{Name: "all"}}, `isolation rule "all": sets no condition`},
		{[]Target{{Name: "runc", Weight: 1}}, []IsolationRule{{Name: "forks", Pipeline: glob(t, "x")}}, `isolation rule "forks": no target is isolated`},
	} {
		if _, err := NewTable(tc.targets, "", tc.rules...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewTable(%v) = %v; want an error containing %q", tc.rules, err, tc.want)
		}
	}
}
