package worker

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/buildfleet/buildfleet/internal/build"
)

// takeoverReportEvery is how often the builds taken over from other replicas are summed up
// in the log. A replica that adopts a crashed peer's 10,000 builds logs one line when the
// first comes in and one line per report while more do, not one line per build.
const takeoverReportEvery = 2 * time.Second

// takeoverQuietReports is how many reports with nothing new from a replica it takes for
// that replica's tally to be forgotten (its next build taken is logged as a first again).
const takeoverQuietReports = 30 // a minute

// Ways a build is taken over, as the log and the metric name them.
const (
	takeoverHandover = "handover" // the owner gave it back (a shutdown, or a counted failure)
	takeoverRecovery = "recovery" // the owner vanished: its liveness key is gone
)

// takeovers tallies the builds this replica took from others, by the incarnation that held
// them, for the log.
type takeovers struct {
	mu sync.Mutex
	m  map[takeoverKey]*takeoverTally
}

type takeoverKey struct{ how, owner string }

type takeoverTally struct {
	replica  string // the replica's name, as the taken record named it
	n        int    // builds taken
	reported int    // n when last reported
	quiet    int    // reports since the last build taken
}

// takeoverHow names how a claim took its build, or "" when it took none from another
// incarnation.
func takeoverHow(h build.How) string {
	switch h {
	case build.Adopted:
		return takeoverHandover
	case build.Recovered:
		return takeoverRecovery
	}
	return ""
}

// takeoverLevel is the level a takeover is told at: a recovery follows a crash, a warning;
// a handover is routine.
func takeoverLevel(how string) slog.Level {
	if how == takeoverRecovery {
		return slog.LevelWarn
	}
	return slog.LevelInfo
}

// note counts one build taken, how, from the incarnation owner (replica by name). It
// reports whether it is the first build taken that way from that incarnation lately.
func (t *takeovers) note(how, owner, replica string) (first bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = make(map[takeoverKey]*takeoverTally)
	}
	k := takeoverKey{how, owner}
	c, ok := t.m[k]
	if !ok {
		c = &takeoverTally{replica: replica}
		t.m[k] = c
	}
	c.n++
	c.quiet = 0
	return !ok
}

// report logs, for each incarnation builds were taken from since the last report, how many
// have been taken from it in all, and forgets the incarnations that have gone quiet.
func (t *takeovers) report(log *slog.Logger) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, c := range t.m {
		if c.n == c.reported {
			if c.quiet++; c.quiet >= takeoverQuietReports {
				delete(t.m, k)
			}
			continue
		}
		log.Log(context.Background(), takeoverLevel(k.how), "took over builds of another replica",
			"from", c.replica, "how", k.how, "builds", c.n, "since_last_report", c.n-c.reported)
		c.reported = c.n
	}
}

// reportTakeovers reports the builds taken over every takeoverReportEvery until ctx ends,
// and once more then.
func (w *Worker) reportTakeovers(ctx context.Context) error {
	tick := time.NewTicker(takeoverReportEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			w.takeovers.report(w.log)
			return nil
		case <-tick.C:
			w.takeovers.report(w.log)
		}
	}
}

// tookOver counts a build this session's claim took from another incarnation (owner, on
// replica) and logs it: the first from that incarnation at once, the rest in the reports.
func (s *session) tookOver(how, owner, replica string, failures int) {
	s.w.metrics.BuildsTakenOver.WithLabelValues(how).Inc()
	level := slog.LevelDebug
	if s.w.takeovers.note(how, owner, replica) {
		level = takeoverLevel(how)
	}
	msg := "taking over a build handed over by another replica"
	if how == takeoverRecovery {
		msg = "taking over a build whose owner's liveness is gone"
	}
	s.log.Log(context.Background(), level, msg, "from", replica, "failures", failures)
}
