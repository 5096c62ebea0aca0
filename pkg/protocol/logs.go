package protocol

import "time"

// LogChunk is one piece of a build's output, in order: whole lines of one step, with the
// build's secret values masked. The fleet publishes the chunks of build id on
// LogSubject(id), in the stream LogStream(), each one appended only right after the one
// before it (compare-and-set on the subject's last sequence), so that no line is ever
// doubled or lost, whichever replica reads the workload's output.
//
// A reader finds the chunks contiguous: each one's Offset is the previous one's Offset plus
// the length of its Text, except where the middle of a log longer than the fleet's cap was
// cut out (the head and the tail are kept); there Offset and Line jump ahead, and the last
// chunk's End says how much was cut in all.
type LogChunk struct {
	// BuildID is the build whose output this is; it equals the subject's last token.
	BuildID string `json:"build_id"`
	// Offset is where Text starts in the build's whole output, in bytes.
	Offset int64 `json:"offset"`
	// Line is the number, from 1, of Text's first line in the whole output.
	Line int64 `json:"line"`
	// Step names the step of a multi-step build that printed Text; empty for a command.
	Step string `json:"step,omitempty"`
	// Text is whole lines; the last may lack its newline at the end of the output, or when
	// a line longer than a chunk was split.
	Text string `json:"text,omitempty"`
	// Note is a remark of the fleet's about the output, for example that the build runs
	// again from the start because the process that ran it could not be adopted.
	Note string `json:"note,omitempty"`
	// Time is when the fleet read Text from the workload.
	Time time.Time `json:"time"`
	// End is set on the last chunk, once the workload's output is complete.
	End *LogEnd `json:"end,omitempty"`
}

// LogEnd closes a build's log.
type LogEnd struct {
	// Bytes and Lines count the whole output, including what was cut.
	Bytes int64 `json:"bytes"`
	Lines int64 `json:"lines"`
	// CutBytes and CutLines count what was cut out of the middle and is not stored.
	CutBytes int64 `json:"cut_bytes,omitempty"`
	CutLines int64 `json:"cut_lines,omitempty"`
}

// LogSubject is where the output of build id is published.
func (l Layout) LogSubject(id string) string { return l.Prefix + ".logs." + id }

// AllLogs matches the output of every build.
func (l Layout) AllLogs() string { return l.Prefix + ".logs.>" }

// LogWantSubject is where a follower of build id's log says, every LogWantEvery while it
// follows, that it wants the output live: the replica that holds the build follows the
// workload's output into the log until LogWantFor after the last want (with
// BUILDFLEET_LOG_LIVE=wanted; the output is stored when the build ends either way). Plain
// NATS, no stream keeps it.
func (l Layout) LogWantSubject(id string) string { return l.Prefix + ".logwant." + id }

// AllLogWants matches the wants of every build's log.
func (l Layout) AllLogWants() string { return l.Prefix + ".logwant.*" }

// How often a log's follower says it wants the output live, and how long after the last
// want the output is followed.
const (
	LogWantEvery = 10 * time.Second
	LogWantFor   = 3 * LogWantEvery
)

// LogStream keeps build output for the log retention period.
func (l Layout) LogStream() string { return l.stem() + "_LOGS" }

// HeaderLogState carries, on each log chunk, the position in the workload's output that the
// chunk ends at, for the replica that reads on. It is the fleet's own business, not part of
// the contract.
const HeaderLogState = "Buildfleet-Log-State"
