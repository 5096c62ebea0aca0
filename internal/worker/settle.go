package worker

import (
	"context"
	"time"

	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// verb is how a delivery is settled. Every delivery is settled exactly once, by settle, with
// the verb its handling concluded.
type verb int

const (
	// verbNone leaves the message to AckWait: the delivery no longer stands for the build
	// (its replica's liveness lapsed, or the build was taken over), and settling it could
	// settle a newer delivery's message.
	verbNone verb = iota
	verbAck
	verbNak
	verbTerm
	// verbDeadLetter keeps a copy on the dead-letter stream, then terminates the message.
	verbDeadLetter
)

// settlement is the conclusion of one delivery.
type settlement struct {
	verb    verb
	delay   time.Duration   // verbNak
	reason  protocol.Reason // verbTerm, verbDeadLetter
	message string          // verbDeadLetter
}

func ack() settlement                   { return settlement{verb: verbAck} }
func nak(d time.Duration) settlement    { return settlement{verb: verbNak, delay: d} }
func term(r protocol.Reason) settlement { return settlement{verb: verbTerm, reason: r} }
func leave() settlement                 { return settlement{verb: verbNone} }
func deadLetter(r protocol.Reason, msg string) settlement {
	return settlement{verb: verbDeadLetter, reason: r, message: msg}
}

// settle applies st to the request delivery l and stops heartbeating it.
func (w *Worker) settle(ctx context.Context, l *queue.Lease, st settlement) {
	w.settleAs(ctx, "request", l, st)
}

func (w *Worker) settleAs(ctx context.Context, kind string, l *queue.Lease, st settlement) {
	defer w.leases.Remove(l)
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	var err error
	switch st.verb {
	case verbNone:
		return
	case verbAck:
		err = l.Ack(sctx)
	case verbNak:
		err = l.Nak(st.delay)
	case verbTerm:
		err = l.Term(string(st.reason))
	case verbDeadLetter:
		err = w.deadLetter(sctx, kind, l, st.reason, st.message)
	}
	if err != nil {
		w.log.Warn("settling a message failed; the server redelivers it after AckWait", "kind", kind, "verb", st.verb, "err", err)
	}
}

// deadLetter keeps a copy of a message that can never succeed, then terminates it. A dead
// letter that cannot be written is retried a few times (the message is Nak'd), then the
// message is terminated anyway (and logged in full): a poison message must not circle for
// ever.
func (w *Worker) deadLetter(ctx context.Context, kind string, l *queue.Lease, reason protocol.Reason, message string) error {
	err := queue.DeadLetter(ctx, w.js, w.cfg.Layout, kind, l, reason, message)
	if err != nil && l.Delivered < deadLetterTries {
		w.log.Warn("dead letter failed; retrying", "err", err)
		return l.Nak(w.backoff(int(l.Delivered)))
	}
	if err != nil {
		w.log.Error("dead letter failed for good; terminating the message, its body follows",
			"err", err, "subject", l.Msg().Subject(), "reason", reason, "body", string(l.Msg().Data()))
	}
	return l.Term(string(reason))
}

func (v verb) String() string {
	return [...]string{"none", "ack", "nak", "term", "dead letter"}[v]
}
