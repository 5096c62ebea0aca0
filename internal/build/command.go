package build

import (
	"errors"
	"maps"
	"slices"
	"strconv"
)

// Environment variables every build sees, whatever runs it.
const (
	EnvBuildID = "BUILDFLEET_BUILD_ID"
	EnvTarget  = "BUILDFLEET_TARGET"
	EnvAttempt = "BUILDFLEET_ATTEMPT"
	// EnvTraceParent and EnvTraceState carry the W3C trace context, under the names the
	// OpenTelemetry environment carrier reads, so the build continues the build's trace.
	EnvTraceParent = "TRACEPARENT"
	EnvTraceState  = "TRACESTATE"
)

// Environment is the workload's environment: the request's variables, then buildfleet's own,
// set last so a build cannot pass itself off as another one, and the trace context.
func (j Job) Environment() map[string]string {
	vars := maps.Clone(j.Env)
	if vars == nil {
		vars = map[string]string{}
	}
	vars[EnvBuildID] = j.ID
	vars[EnvTarget] = j.Target
	vars[EnvAttempt] = strconv.Itoa(j.Attempt)
	if j.TraceParent != "" {
		vars[EnvTraceParent] = j.TraceParent
		if j.TraceState != "" {
			vars[EnvTraceState] = j.TraceState
		}
	}
	return vars
}

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

// ErrNothingToRun is returned by Argv for a job with neither a command nor steps.
var ErrNothingToRun = errors.New("the build has neither a command nor steps")

// Argv is what runs for the job: its Command, or, when it has Steps, a shell running them in
// order. Every executor runs the same argv, so a build behaves the same on each.
func (j Job) Argv() ([]string, error) {
	if len(j.Steps) > 0 {
		args := []string{"/bin/sh", "-c", stepsScript, "buildfleet-steps"}
		for _, s := range j.Steps {
			args = append(args, s.Name, s.Run)
		}
		return args, nil
	}
	if len(j.Command) == 0 || j.Command[0] == "" {
		return nil, ErrNothingToRun
	}
	return slices.Clone(j.Command), nil
}
