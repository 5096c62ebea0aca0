package logs

import "fmt"

// Follow says when a running build's output is followed into its log as it comes. Either
// way all of it is stored when the build ends or is let go.
type Follow string

const (
	// FollowWanted follows a build's output while someone follows its log (`buildfleet
	// logs -f`, the client's Logs with follow): a running build costs no pods/log stream
	// while nobody looks. The default.
	FollowWanted Follow = "wanted"
	// FollowAlways follows every running build's output: a pods/log stream each.
	FollowAlways Follow = "always"
	// FollowNever reads a build's output only when it ends or is let go.
	FollowNever Follow = "never"
)

// Follows are the values Follow may take.
var Follows = []Follow{FollowWanted, FollowAlways, FollowNever}

// ParseFollow is the Follow s names.
func ParseFollow(s string) (Follow, error) {
	for _, f := range Follows {
		if string(f) == s {
			return f, nil
		}
	}
	return "", fmt.Errorf("must be wanted, always or never (got %q)", s)
}
