package build

import "testing"

func TestMasker(t *testing.T) {
	env := map[string]string{
		"API_TOKEN":   "tok-123456",
		"db_password": "hunter2",
		"GITHUB_KEY":  "ab", // too short to mask
		"PLAIN":       "visible-value",
		"MARKED":      "marked-value",
		"LONG_SECRET": "tok-123456-and-more", // contains API_TOKEN's value: masked whole
	}
	m := NewMasker(env, []string{"MARKED"}, DefaultSecretPatterns)
	for _, tt := range []struct{ in, want string }{
		{"token tok-123456 printed", "token *** printed"},
		{"pw=hunter2;pw=hunter2", "pw=***;pw=***"},
		{"ab visible-value", "ab visible-value"},
		{"marked-value", "***"},
		{"tok-123456-and-more", "***"},
		{"", ""},
	} {
		if got := m.Mask(tt.in); got != tt.want {
			t.Errorf("Mask(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	if (Masker{}).Mask("tok-123456") != "tok-123456" {
		t.Errorf("the zero Masker masked something")
	}
	if !m.Secret("hunter2") || m.Secret("visible-value") {
		t.Errorf("Secret: hunter2 %v, visible-value %v; want true, false", m.Secret("hunter2"), m.Secret("visible-value"))
	}
}

func TestCheckSecretPatterns(t *testing.T) {
	if err := CheckSecretPatterns(DefaultSecretPatterns); err != nil {
		t.Errorf("the defaults: %v", err)
	}
	for _, bad := range []string{"[", "", "a[b"} {
		if err := CheckSecretPatterns([]string{bad}); err == nil {
			t.Errorf("CheckSecretPatterns(%q) = nil, want an error", bad)
		}
	}
}

func TestPieceEnd(t *testing.T) {
	for _, tc := range []struct {
		b    string
		n    int
		want int
	}{
		{"abcdef", 4, 4},
		{"abc", 4, 3},
		{"abé", 3, 2},  // é is 2 bytes at 2..3: cut before it
		{"ab€d", 3, 2}, // € is 3 bytes at 2..4
		{"ab€d", 4, 2},
		{"ab€d", 5, 5},
		{"\xff\xff\xff\xff\xff", 3, 3}, // not UTF-8: cut where asked
	} {
		if got := PieceEnd([]byte(tc.b), tc.n); got != tc.want {
			t.Errorf("PieceEnd(%q, %d) = %d, want %d", tc.b, tc.n, got, tc.want)
		}
	}
}
