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
	pipeline := fs.String("pipeline", "", "the build's pipeline, for the isolation policy")
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
	return nil
}
