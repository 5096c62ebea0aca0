package process

import (
	"errors"
	"maps"
	"slices"
	"strconv"

	"github.com/buildfleet/buildfleet/internal/build"
)

// defaultPath is the build's PATH when the replica itself has none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Environment variables every build sees.
const (
	EnvBuildID = "BUILDFLEET_BUILD_ID"
	EnvTarget  = "BUILDFLEET_TARGET"
	EnvAttempt = "BUILDFLEET_ATTEMPT"
)

// stepsScript runs the steps passed to it as positional pairs (name, script). Each step runs
// in its own `/bin/sh -ec`, so a step fails at its first failing command, and the outer
// `set -e` stops at the first failing step with that step's exit code. Passing the steps as
// arguments rather than pasting them into the script means no quoting can go wrong.
const stepsScript = `set -e
while [ "$#" -gt 0 ]; do
	printf '==> step %s\n' "$1"
	/bin/sh -ec "$2"
	shift 2
done`

var errNothingToRun = errors.New("the build has neither a command nor steps")

// argv is what runs for job: its Command, or, when it has Steps, a shell running them in order.
func argv(job build.Job) ([]string, error) {
	if len(job.Steps) > 0 {
		args := []string{"/bin/sh", "-c", stepsScript, "buildfleet-steps"}
		for _, s := range job.Steps {
			args = append(args, s.Name, s.Run)
		}
		return args, nil
	}
	if len(job.Command) == 0 || job.Command[0] == "" {
		return nil, errNothingToRun
	}
	return slices.Clone(job.Command), nil
}

// environ is the build's whole environment. It starts from a minimal base rather than the
// replica's environment, which holds credentials a build must not see. parentPath is the
// replica's PATH.
func environ(job build.Job, workDir, parentPath string) []string {
	if parentPath == "" {
		parentPath = defaultPath
	}
	env := map[string]string{
		"PATH":     parentPath,
		"HOME":     workDir,
		"TMPDIR":   workDir,
		"LANG":     "C.UTF-8",
		EnvTarget:  job.Target,
		EnvAttempt: strconv.Itoa(job.Attempt),
	}
	maps.Copy(env, job.Env)
	// Set last so a build cannot pass itself off as another one.
	env[EnvBuildID] = job.ID
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}
