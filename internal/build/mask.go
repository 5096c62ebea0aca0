package build

import (
	"fmt"
	"path"
	"slices"
	"strings"
)

// DefaultSecretPatterns name the variables whose values are secrets unless the operator says
// otherwise: shell-style patterns matched against the variable's name, ignoring case.
var DefaultSecretPatterns = []string{"*_TOKEN", "*_SECRET", "*_PASSWORD", "*_KEY", "*_CREDENTIALS",
	"TOKEN", "SECRET", "PASSWORD", "*_PASSWD", "*_API_KEY", "*_PRIVATE_KEY"}

// Masked replaces a secret value in text the fleet publishes or logs.
const Masked = "***"

// minSecretLen is the shortest value masked: a one- or two-character value would mask every
// occurrence of those characters in the text, and hides nothing worth hiding.
const minSecretLen = 3

// CheckSecretPatterns reports a pattern that is not a valid shell pattern.
func CheckSecretPatterns(patterns []string) error {
	for _, p := range patterns {
		if _, err := path.Match(p, ""); err != nil || p == "" {
			return fmt.Errorf("%q is not a shell pattern such as *_TOKEN", p)
		}
	}
	return nil
}

// Masker hides the values of a build's secret variables. The zero Masker hides nothing.
type Masker struct {
	values []string // longest first, so that a value containing another is masked whole
}

// NewMasker masks the values of the variables in env whose names match one of patterns
// (ignoring case), and of those named in secret.
func NewMasker(env map[string]string, secret []string, patterns []string) Masker {
	var m Masker
	for name, v := range env {
		if len(v) < minSecretLen || !(slices.Contains(secret, name) || matchesAny(name, patterns)) {
			continue
		}
		m.values = append(m.values, v)
	}
	slices.SortFunc(m.values, func(a, b string) int { return len(b) - len(a) })
	m.values = slices.Compact(m.values)
	return m
}

func matchesAny(name string, patterns []string) bool {
	upper := strings.ToUpper(name)
	for _, p := range patterns {
		if ok, _ := path.Match(strings.ToUpper(p), upper); ok {
			return true
		}
	}
	return false
}

// Mask returns s with every secret value replaced by Masked.
func (m Masker) Mask(s string) string {
	for _, v := range m.values {
		s = strings.ReplaceAll(s, v, Masked)
	}
	return s
}

// Secret reports whether value is one of the masked values.
func (m Masker) Secret(value string) bool { return slices.Contains(m.values, value) }
