package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func runQueue(ctx context.Context, args []string, stdio Stdio) error {
	c, err := newClientCmd("queue", "[flags]", stdio)
	if err != nil {
		return err
	}
	asJSON := c.fs.Bool("json", false, "print the merged status as JSON")
	head := c.fs.Int("next", 5, "waiting builds to list per tenant")
	wait := c.fs.Duration("wait", time.Second, "how long to gather the replicas' answers")
	return c.run(args, exactly(0, "queue takes no arguments"), func(cl *client.Client, _ []string) error {
		if *head < 0 || *wait <= 0 {
			return usageError("--next must not be negative and --wait must be positive")
		}
		answers, err := cl.Queue(ctx, *head, *wait)
		if err != nil {
			return err
		}
		st := mergeQueue(answers)
		if *asJSON {
			enc := json.NewEncoder(stdio.Out)
			enc.SetIndent("", "  ")
			return enc.Encode(st)
		}
		printQueue(stdio.Out, st)
		return nil
	})
}

// mergeQueue makes one status of the replicas' answers: the waiting builds of every replica
// that holds some (normally one, the scheduler), and the fleet's counts as the scheduler
// (else the replica that counted most) read them.
func mergeQueue(answers []protocol.QueueStatus) protocol.QueueStatus {
	slices.SortFunc(answers, func(a, b protocol.QueueStatus) int {
		switch {
		case a.Scheduling != b.Scheduling:
			if a.Scheduling {
				return -1
			}
			return 1
		case a.Running != b.Running:
			return b.Running - a.Running
		}
		return strings.Compare(a.Replica, b.Replica)
	})
	out := answers[0]
	for _, a := range answers {
		out.Unread = max(out.Unread, a.Unread) // each read it at its own moment
	}
	out.Tenants = nil
	out.Waiting = 0
	out.Current = true
	byTenant := map[string]int{}
	var schedulers []string
	for _, a := range answers {
		if !a.Scheduling {
			continue
		}
		schedulers = append(schedulers, a.Replica)
		out.Waiting += a.Waiting
		out.Current = out.Current && a.Current
		for _, t := range a.Tenants {
			if i, ok := byTenant[t.Tenant]; ok {
				m := &out.Tenants[i]
				m.Waiting += t.Waiting
				m.Next = append(m.Next, t.Next...)
				continue
			}
			byTenant[t.Tenant] = len(out.Tenants)
			out.Tenants = append(out.Tenants, t)
		}
	}
	out.Replica = strings.Join(schedulers, ",")
	slices.SortFunc(out.Targets, func(a, b protocol.TargetStatus) int { return strings.Compare(a.Target, b.Target) })
	return out
}

func printQueue(w io.Writer, st protocol.QueueStatus) {
	capText := func(n int) string {
		if n <= 0 {
			return "-"
		}
		return fmt.Sprint(n)
	}
	fmt.Fprintf(w, "running: %d of %d\n", st.Running, st.MaxRunning)
	if st.Unread > 0 {
		fmt.Fprintf(w, "not yet read by the scheduler: %d (it holds at most BUILDFLEET_QUEUE_HOLD; these wait in arrival order)\n", st.Unread)
	}
	if st.Waiting == 0 {
		fmt.Fprintln(w, "waiting: nothing")
	} else {
		fmt.Fprintf(w, "waiting: %d (held by %s)\n", st.Waiting, st.Replica)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TENANT\tWAITING\tRUNNING\tWEIGHT\tCAP\tWHY")
		for _, t := range st.Tenants {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%s\n", t.Tenant, t.Waiting, t.Running, t.Weight, capText(t.Cap), t.Why)
		}
		_ = tw.Flush()
		for _, t := range st.Tenants {
			if len(t.Next) == 0 {
				continue
			}
			fmt.Fprintf(w, "\nnext of %s:\n", t.Tenant)
			for _, b := range t.Next {
				prio := fmt.Sprintf("priority %d", b.Priority)
				if b.Asked != 0 {
					prio += fmt.Sprintf(" (asked %d)", b.Asked)
				}
				fmt.Fprintf(w, "  %s  %s  waited %s\n", b.ID, prio, (time.Duration(b.WaitedSeconds * float64(time.Second))).Round(100*time.Millisecond))
				if b.Why != "" {
					fmt.Fprintf(w, "    %s\n", b.Why)
				}
			}
		}
	}
	if len(st.Targets) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TARGET\tRUNNING\tCAP")
		for _, t := range st.Targets {
			fmt.Fprintf(tw, "%s\t%d\t%s\n", t.Target, t.Running, capText(t.MaxRunning))
		}
		_ = tw.Flush()
	}
}
