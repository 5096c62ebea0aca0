package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func runRoute(_ context.Context, args []string, stdio Stdio) error {
	s, err := config.Load()
	if err != nil {
		return err
	}
	fs := flagSet("route", "[flags] --image IMAGE", stdio)
	fs.StringVar(&s.TargetsFile, "targets", s.TargetsFile, "targets file (BUILDFLEET_TARGETS_FILE); empty: one local process target")
	image := fs.String("image", "", "the build's image (required)")
	id := fs.String("id", "example", "build id: the weighted choice is deterministic per id")
	annotations := kvFlag{}
	fs.Var(annotations, "annotation", "KEY=VALUE annotation (repeatable), e.g. "+protocol.AnnotationTarget+"=kata")
	pipeline := fs.String("pipeline", "", "the build's pipeline, for the isolation policy and its tenant")
	job := fs.String("job", "", "the build's job, for the isolation policy")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *image == "" || fs.NArg() > 0 {
		return usageError("route needs --image and no arguments")
	}
	if !protocol.ValidID(*id) {
		return usageError("--id %q: must match %s", *id, protocol.IDPattern)
	}
	targets, _, err := loadTargets(s)
	if err != nil {
		return err
	}
	table, err := targets.Table()
	if err != nil {
		return err
	}
	dec, err := table.Choose(routing.Request{BuildID: *id, Image: *image, Pin: annotations[protocol.AnnotationTarget],
		Annotations: annotations, Pipeline: *pipeline, Job: *job}, nil)
	var rej *routing.Rejection
	switch {
	case errors.As(err, &rej):
		for _, line := range rej.Explanation {
			fmt.Fprintln(stdio.Out, "  "+line)
		}
		fmt.Fprintf(stdio.Out, "rejected (%s): %s\n", rej.Reason, rej.Message)
		return &ExitError{Code: ExitRejected}
	case err != nil:
		return err
	}
	for _, line := range dec.Explanation {
		fmt.Fprintln(stdio.Out, "  "+line)
	}
	fmt.Fprintf(stdio.Out, "target %s (rule: %s)\n", dec.Target, dec.Rule)
	// Who it counts against, and where it stands in its tenant's line.
	policy := targets.FairPolicy()
	req := protocol.BuildRequest{ID: *id, Image: *image, Annotations: annotations, Pipeline: *pipeline, Job: *job}
	tenant := policy.Tenant(req)
	prio, asked, err := policy.Priority(req, tenant)
	if err != nil {
		return usageError("%v", err)
	}
	lim := policy.Limits(tenant)
	line := fmt.Sprintf("tenant %s (weight %d", tenant, lim.Weight)
	if lim.Cap > 0 {
		line += fmt.Sprintf(", cap %d", lim.Cap)
	}
	line += fmt.Sprintf("), priority %d", prio)
	if asked != prio {
		line += fmt.Sprintf(" (asked %d; the tenant's max_priority is %d)", asked, lim.MaxPriority)
	}
	if t, ok := targets.Find(dec.Target); ok && t.MaxRunning > 0 {
		line += fmt.Sprintf("; target %s runs at most %d builds at once", t.Name, t.MaxRunning)
	}
	fmt.Fprintln(stdio.Out, line)
	return nil
}
