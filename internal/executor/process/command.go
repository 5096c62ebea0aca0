package process

import (
	"maps"
	"slices"

	"github.com/buildfleet/buildfleet/internal/build"
)

// defaultPath is the build's PATH when the replica itself has none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// environ is the build's whole environment. It starts from a minimal base rather than the
// replica's environment, which holds credentials a build must not see. parentPath is the
// replica's PATH.
func environ(job build.Job, workDir, parentPath string) []string {
	if parentPath == "" {
		parentPath = defaultPath
	}
	env := map[string]string{
		"PATH":   parentPath,
		"HOME":   workDir,
		"TMPDIR": workDir,
		"LANG":   "C.UTF-8",
	}
	maps.Copy(env, job.Environment())
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}
