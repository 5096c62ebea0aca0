package worker

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/buildfleet/buildfleet/internal/build"
)

// Breaker defaults.
const (
	DefaultBreakerFailures = 5
	DefaultBreakerCooldown = 30 * time.Second
)

// breakers hold one circuit breaker per target, around its executor's Launch. A target whose
// launches keep failing transiently (an apiserver that is down, throttling, timeouts) opens
// its breaker: new builds are routed to the next eligible target meanwhile, and builds already
// routed there are retried with backoff instead of hammering it. After the cooldown one
// launch is let through to probe it.
type breakers map[string]*gobreaker.CircuitBreaker[struct{}]

func newBreakers(cfg Config, log *slog.Logger) breakers {
	failures := cfg.BreakerFailures
	if failures == 0 {
		failures = DefaultBreakerFailures
	}
	cooldown := cfg.BreakerCooldown
	if cooldown == 0 {
		cooldown = DefaultBreakerCooldown
	}
	b := breakers{}
	for name := range cfg.Targets {
		b[name] = gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{
			Name:        name,
			MaxRequests: 1,
			Timeout:     cooldown,
			ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= uint32(failures) },
			// A permanent error is the target answering (refusing one build); only transient
			// errors say it is unwell. A launch cut short by shutdown says nothing.
			IsSuccessful: func(err error) bool {
				_, permanent := build.AsPermanent(err)
				return err == nil || permanent
			},
			IsExcluded: func(err error) bool {
				return errors.Is(err, errLaunchCut)
			},
			OnStateChange: func(name string, from, to gobreaker.State) {
				log.Warn("target circuit breaker changed state", "target", name, "from", from.String(), "to", to.String())
			},
		})
	}
	return b
}

// open reports whether target's breaker is open: routing skips it.
func (b breakers) open(target string) bool {
	cb, ok := b[target]
	return ok && cb.State() == gobreaker.StateOpen
}

// unavailable is the router's view of the breakers: why target can take no build now.
func (b breakers) unavailable(target string) string {
	if b.open(target) {
		return "breaker open"
	}
	return ""
}

// launch runs the executor's Launch through target's breaker. An open breaker is a transient
// error: the build is retried with backoff. A launch cut short by its own context (a stop, a
// handover) says nothing about the target and is not counted.
func (b breakers) launch(ctx context.Context, target string, launch func() error) error {
	cb, ok := b[target]
	if !ok {
		return launch()
	}
	var launchErr error
	_, err := cb.Execute(func() (struct{}, error) {
		launchErr = launch()
		if launchErr != nil && ctx.Err() != nil {
			return struct{}{}, errLaunchCut
		}
		return struct{}{}, launchErr
	})
	switch {
	case errors.Is(err, gobreaker.ErrOpenState), errors.Is(err, gobreaker.ErrTooManyRequests):
		return build.Unavailable(errors.Join(errTargetUnavailable, err))
	case errors.Is(err, errLaunchCut):
		return launchErr
	}
	return err
}

// errLaunchCut marks, for the breaker only, a launch its own context ended.
var errLaunchCut = errors.New("launch cut short by its context")

// BreakerStates returns each target's breaker state (closed, half-open, open), for health and
// metrics.
func (w *Worker) BreakerStates() map[string]string {
	out := make(map[string]string, len(w.breakers))
	for name, cb := range w.breakers {
		out[name] = cb.State().String()
	}
	return out
}

var errTargetUnavailable = errors.New("target unavailable: its circuit breaker is open after repeated launch failures")
