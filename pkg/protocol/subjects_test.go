package protocol

import "testing"

func TestParseRunSubject(t *testing.T) {
	l := Layout{Prefix: "bf"}
	if target, tenant, ok := l.ParseRunSubject(l.RunSubject("east", "team-a")); !ok || target != "east" || tenant != "team-a" {
		t.Errorf("ParseRunSubject(RunSubject(east, team-a)) = %q, %q, %v", target, tenant, ok)
	}
	for _, bad := range []string{"bf.run.east", "bf.requests.x", "other.run.east.a", "bf.run.east.a.b"} {
		if _, _, ok := l.ParseRunSubject(bad); ok {
			t.Errorf("ParseRunSubject(%q) ok, want not a run subject", bad)
		}
	}
}
