package main

// The container image is built by the Dockerfile, which needs a Docker daemon that CI and this
// machine may not have. These tests check what can be checked without one: that the Dockerfile
// keeps the shape the project relies on (cached module download, a shared build command,
// distroless static nonroot), and that the build command it runs — `make build` — succeeds and
// yields a static, trimmed, version-stamped binary. Only the `docker build` itself is unchecked.

import (
	"bufio"
	"context"
	"debug/buildinfo"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	// versionVar is the variable the build stamps with -ldflags -X.
	versionVar = "github.com/buildfleet/buildfleet/internal/cli.Version"
	// imageBinary is where the final stage puts the binary; ENTRYPOINT runs it.
	imageBinary = "/buildfleet"
	// buildTimeout bounds the build the test runs: ~30–60 s cold on a 2-core machine, but `make
	// test` runs it next to every other package.
	buildTimeout = 10 * time.Minute
)

// instruction is one Dockerfile instruction, its continuation lines joined.
type instruction struct {
	line  int      // line of its first physical line, for messages
	cmd   string   // upper-cased keyword: FROM, RUN, COPY, ...
	flags []string // leading --flags: --mount=..., --from=...
	args  string   // the rest
}

func (in instruction) String() string {
	return strings.Join(append(append([]string{in.cmd}, in.flags...), in.args), " ")
}

// stage is one FROM and the instructions under it.
type stage struct {
	from instruction
	name string // the AS name, lower-cased
	body []instruction
}

// parseDockerfile splits a Dockerfile into stages. It knows just enough of the syntax for this
// file: comments, line continuations with `\`, leading --flags and FROM ... AS name.
func parseDockerfile(src string) ([]stage, error) {
	var (
		stages  []stage
		pending strings.Builder
		start   int
	)
	flush := func() error {
		text := strings.TrimSpace(pending.String())
		pending.Reset()
		if text == "" {
			return nil
		}
		kw, rest, _ := strings.Cut(text, " ")
		in := instruction{line: start, cmd: strings.ToUpper(kw)}
		rest = strings.TrimSpace(rest)
		for strings.HasPrefix(rest, "--") {
			flag, after, _ := strings.Cut(rest, " ")
			in.flags = append(in.flags, flag)
			rest = strings.TrimSpace(after)
		}
		in.args = rest
		if in.cmd == "FROM" {
			st := stage{from: in}
			if f := strings.Fields(in.args); len(f) == 3 && strings.EqualFold(f[1], "AS") {
				st.name = strings.ToLower(f[2])
			}
			stages = append(stages, st)
			return nil
		}
		if len(stages) == 0 {
			if in.cmd == "ARG" {
				return nil // a global ARG before the first FROM
			}
			return fmt.Errorf("line %d: %s before the first FROM", in.line, in.cmd)
		}
		stages[len(stages)-1].body = append(stages[len(stages)-1].body, in)
		return nil
	}
	sc := bufio.NewScanner(strings.NewReader(src))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue // comments may also sit between continuation lines
		}
		if pending.Len() == 0 {
			start = n
		}
		if body, ok := strings.CutSuffix(line, `\`); ok {
			pending.WriteString(body + " ")
			continue
		}
		pending.WriteString(line)
		if err := flush(); err != nil {
			return nil, err
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if pending.Len() > 0 {
		return nil, fmt.Errorf("line %d: continuation runs off the end of the file", start)
	}
	return stages, nil
}

// hasCacheMount reports whether the instruction mounts a build cache at target.
func hasCacheMount(in instruction, target string) bool {
	for _, f := range in.flags {
		v, ok := strings.CutPrefix(f, "--mount=")
		if !ok {
			continue
		}
		opts := strings.Split(v, ",")
		if slices.Contains(opts, "type=cache") && slices.Contains(opts, "target="+target) {
			return true
		}
	}
	return false
}

// buildCommand is the build stage's `make build ...` RUN, split into words.
type buildCommand struct {
	in   instruction
	args []string // after "make"
	bin  string   // the BIN= value: where the binary is written in the build stage
}

// readRepo returns the repository root (two up from this package) and a file in it.
func readRepo(t *testing.T, name string) (root, content string) {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("repository root %s: %v", root, err)
	}
	b, err := os.ReadFile(filepath.Join(root, name))
	if err != nil {
		t.Fatal(err)
	}
	return root, string(b)
}

// checkDockerfile checks the Dockerfile's shape and returns its build command. Every message
// names the line and what drifted from the project's image habits (STYLE.md, habit 14).
func checkDockerfile(t *testing.T, src, goMod string) buildCommand {
	t.Helper()
	stages, err := parseDockerfile(src)
	if err != nil {
		t.Fatalf("Dockerfile: %v", err)
	}
	if len(stages) != 2 {
		t.Fatalf("Dockerfile has %d stages, want 2: a golang build stage and a distroless final stage", len(stages))
	}
	build, final := stages[0], stages[1]

	// The build stage: the Go image of go.mod's toolchain, named for COPY --from.
	image, _, _ := strings.Cut(strings.Fields(build.from.args)[0], "@")
	tag, ok := strings.CutPrefix(image, "golang:")
	if !ok || build.name != "build" {
		t.Errorf("Dockerfile:%d: %s, want FROM golang:<go.mod's go version> AS build", build.from.line, build.from)
	} else if release, _, _ := strings.Cut(tag, "-"); goMinor("go "+release) != goMinor(goMod) {
		// golang:1.26 or golang:1.26-bookworm for go 1.26.x. The image sets GOTOOLCHAIN=local,
		// so an older release than go.mod's fails the build rather than fetching a toolchain.
		t.Errorf("Dockerfile:%d: build stage uses golang:%s but go.mod says go %s: keep them on the same release", build.from.line, tag, goMinor(goMod))
	}

	// Modules are downloaded, with a cache mount, from go.mod and go.sum alone, before the source
	// is copied: otherwise every source change downloads every module again.
	download, copyAll := -1, -1
	for i, in := range build.body {
		switch {
		case in.cmd == "RUN" && in.args == "go mod download" && download < 0:
			download = i
			if !hasCacheMount(in, "/go/pkg/mod") {
				t.Errorf("Dockerfile:%d: %s: want --mount=type=cache,target=/go/pkg/mod so the module download is cached", in.line, in)
			}
			if i == 0 || build.body[i-1].cmd != "COPY" || build.body[i-1].args != "go.mod go.sum ./" {
				t.Errorf("Dockerfile:%d: go mod download must directly follow COPY go.mod go.sum ./ (only those two files, so the layer survives source changes)", in.line)
			}
		case in.cmd == "COPY" && len(in.flags) == 0 && in.args == ". ." && copyAll < 0:
			copyAll = i
		}
	}
	switch {
	case download < 0:
		t.Errorf("Dockerfile: build stage has no RUN --mount=type=cache,target=/go/pkg/mod go mod download")
	case copyAll < 0:
		t.Errorf("Dockerfile: build stage has no COPY . .")
	case download > copyAll:
		t.Errorf("Dockerfile:%d: go mod download comes after COPY . . (line %d): the module download is redone on every source change", build.body[download].line, build.body[copyAll].line)
	}

	// The build itself is one RUN of the Makefile's build target: the same command as outside
	// Docker, so CGO_ENABLED=0, -trimpath and the ldflags live in one place.
	var bc buildCommand
	var runs []instruction
	for _, in := range build.body {
		if in.cmd == "RUN" && strings.HasPrefix(in.args, "make ") {
			runs = append(runs, in)
		}
	}
	if len(runs) != 1 {
		t.Fatalf("Dockerfile: build stage has %d RUN make ... instructions, want exactly one: RUN make build BIN=... VERSION=${VERSION}, the Makefile's build command", len(runs))
	}
	bc.in = runs[0]
	if strings.ContainsAny(bc.in.args, "&|;<>`'\"") {
		t.Fatalf("Dockerfile:%d: %s: want a single plain `make build ...` command, so this test can run it as it stands", bc.in.line, bc.in)
	}
	words := strings.Fields(bc.in.args)
	bc.args = words[1:]
	var versionOK bool
	for _, w := range bc.args {
		switch {
		case strings.HasPrefix(w, "BIN="):
			bc.bin = strings.TrimPrefix(w, "BIN=")
		case w == "VERSION=${VERSION}" || w == "VERSION=$VERSION":
			versionOK = true
		}
	}
	if !slices.Contains(bc.args, "build") || bc.bin == "" || !versionOK {
		t.Errorf("Dockerfile:%d: %s: want make build BIN=<path> VERSION=${VERSION}", bc.in.line, bc.in)
	}
	if i := slices.IndexFunc(build.body, func(in instruction) bool { return in.cmd == "ARG" && argName(in) == "VERSION" }); i < 0 || build.body[i].line > bc.in.line {
		t.Errorf("Dockerfile:%d: no ARG VERSION before the build command: make image's --build-arg VERSION would not reach it", bc.in.line)
	}
	for _, cache := range []string{"/go/pkg/mod", "/root/.cache/go-build"} {
		if !hasCacheMount(bc.in, cache) {
			t.Errorf("Dockerfile:%d: the build RUN has no --mount=type=cache,target=%s", bc.in.line, cache)
		}
	}
	if copyAll >= 0 && bc.in.line < build.body[copyAll].line {
		t.Errorf("Dockerfile:%d: the build RUN comes before COPY . .", bc.in.line)
	}

	// The final stage: distroless static nonroot, the binary only, run as 65532.
	if got := strings.Fields(final.from.args)[0]; !strings.HasPrefix(got, "gcr.io/distroless/static") || !strings.Contains(got, ":nonroot") {
		t.Errorf("Dockerfile:%d: final stage is FROM %s, want gcr.io/distroless/static-debian12:nonroot", final.from.line, got)
	}
	last := func(cmd string) (instruction, bool) {
		for i := len(final.body) - 1; i >= 0; i-- {
			if final.body[i].cmd == cmd {
				return final.body[i], true
			}
		}
		return instruction{}, false
	}
	if !slices.ContainsFunc(final.body, func(in instruction) bool {
		return in.cmd == "COPY" && slices.Contains(in.flags, "--from=build") && in.args == bc.bin+" "+imageBinary
	}) {
		t.Errorf("Dockerfile: final stage has no COPY --from=build %s %s: it must copy what the build command wrote (BIN=%s)", bc.bin, imageBinary, bc.bin)
	}
	if in, ok := last("USER"); !ok || in.args != "65532:65532" {
		t.Errorf("Dockerfile: final stage's USER is %q, want USER 65532:65532 (distroless nonroot, numeric so runAsNonRoot can verify it)", in.args)
	}
	for _, form := range []struct {
		cmd  string
		want []string
	}{{"ENTRYPOINT", []string{imageBinary}}, {"CMD", []string{"worker"}}} {
		in, _ := last(form.cmd)
		var got []string
		if err := json.Unmarshal([]byte(in.args), &got); err != nil || !slices.Equal(got, form.want) {
			t.Errorf("Dockerfile: final stage's %s is %q, want the exec form %s %q", form.cmd, in.args, form.cmd, form.want)
		}
	}
	if !slices.ContainsFunc(final.body, func(in instruction) bool {
		return in.cmd == "EXPOSE" && slices.Contains(strings.Fields(in.args), "9090")
	}) {
		t.Errorf("Dockerfile: final stage does not EXPOSE 9090, the worker's /healthz, /readyz and /metrics port")
	}
	if !slices.ContainsFunc(final.body, func(in instruction) bool { return in.cmd == "ARG" && argName(in) == "VERSION" }) {
		t.Errorf("Dockerfile: final stage has no ARG VERSION: its labels would not carry the version")
	}
	var labels strings.Builder
	for _, in := range final.body {
		if in.cmd == "LABEL" {
			labels.WriteString(in.args + " ")
		}
	}
	for _, key := range []string{"org.opencontainers.image.source=", "org.opencontainers.image.title=", `org.opencontainers.image.version="${VERSION}"`} {
		if !strings.Contains(labels.String(), key) {
			t.Errorf("Dockerfile: final stage has no LABEL %s", key)
		}
	}
	return bc
}

// argName is the name an ARG instruction declares.
func argName(in instruction) string {
	name, _, _ := strings.Cut(in.args, "=")
	return name
}

// goMinor returns "1.N" from go.mod's go directive, or "" if there is none.
func goMinor(goMod string) string {
	for line := range strings.Lines(goMod) {
		v, ok := strings.CutPrefix(strings.TrimSpace(line), "go ")
		if !ok {
			continue
		}
		parts := strings.SplitN(strings.TrimSpace(v), ".", 3)
		if len(parts) < 2 {
			return v
		}
		return parts[0] + "." + parts[1]
	}
	return ""
}

// TestDockerfileShape checks the Dockerfile without building anything.
func TestDockerfileShape(t *testing.T) {
	_, src := readRepo(t, "Dockerfile")
	_, goMod := readRepo(t, "go.mod")
	checkDockerfile(t, src, goMod)

	// The build context leaves out what is big or the build stage must not see.
	_, ignore := readRepo(t, ".dockerignore")
	var entries []string
	for line := range strings.Lines(ignore) {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			entries = append(entries, strings.Trim(line, "/"))
		}
	}
	for _, want := range []string{".git", "bin", "test/bin", ".buildfleet"} {
		if !slices.Contains(entries, want) {
			t.Errorf(".dockerignore does not exclude %s", want)
		}
	}
}

// TestDockerfileBuildCommand runs the Dockerfile's build command outside Docker and checks the
// binary it makes: what `docker build` would put in the image, short of the docker build itself.
func TestDockerfileBuildCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary with the Dockerfile's make command (~30–60 s cold); run without -short, as make test does")
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed; the Dockerfile's build command is a make command")
	}
	root, src := readRepo(t, "Dockerfile")
	_, goMod := readRepo(t, "go.mod")
	bc := checkDockerfile(t, src, goMod)
	if t.Failed() {
		t.FailNow()
	}

	// The command as the Dockerfile has it, with the output moved to a temporary directory and a
	// version only this run uses, so the stamp seen below cannot come from an earlier build.
	bin := filepath.Join(t.TempDir(), "out", "buildfleet")
	version := "test-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	args := []string{"-C", root}
	for _, a := range bc.args {
		switch {
		case strings.HasPrefix(a, "BIN="):
			a = "BIN=" + bin
		case strings.HasPrefix(a, "VERSION="):
			a = "VERSION=" + version
		case strings.Contains(a, "$"):
			t.Fatalf("Dockerfile:%d: %s: %q uses a variable this test cannot give a value", bc.in.line, bc.in, a)
		}
		args = append(args, a)
	}
	ctx, cancel := context.WithTimeout(t.Context(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "make", args...)
	// Like the docker build, not a sub-make of whatever make runs this test (make test): no
	// inherited jobserver or command-line variables.
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		name, _, _ := strings.Cut(kv, "=")
		return name == "MAKEFLAGS" || name == "MFLAGS" || name == "MAKELEVEL"
	})
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the Dockerfile's build command (Dockerfile:%d) failed outside Docker: make %s: %v\n%s", bc.in.line, strings.Join(args, " "), err, out)
	}
	t.Logf("make %s: %v", strings.Join(args, " "), time.Since(start).Round(time.Millisecond))

	// CGO off, trimmed and stamped, as recorded by the go command in the binary.
	info, err := buildinfo.ReadFile(bin)
	if err != nil {
		t.Fatalf("build info of %s: %v", bin, err)
	}
	settings := map[string]string{}
	for _, s := range info.Settings {
		settings[s.Key] = s.Value
	}
	if got := settings["CGO_ENABLED"]; got != "0" {
		t.Errorf("binary built with CGO_ENABLED=%q, want 0: the distroless static image has no libc", got)
	}
	if got := settings["-trimpath"]; got != "true" {
		t.Errorf("binary built with -trimpath=%q, want true: without it the image carries build-machine paths", got)
	}
	// The go command does not record -ldflags when -trimpath is on (they may hold paths), so the
	// flags are checked by their effects: -s and -w below, -X by `buildfleet version`.

	// Static: no interpreter and no dynamic section, so it runs on distroless/static; and
	// stripped of symbols (-s) and DWARF (-w).
	if runtime.GOOS == "linux" {
		f, err := elf.Open(bin)
		if err != nil {
			t.Fatalf("%s is not an ELF file: %v", bin, err)
		}
		defer f.Close()
		for _, p := range f.Progs {
			switch p.Type {
			case elf.PT_INTERP:
				t.Errorf("binary has a PT_INTERP program header: it is dynamically linked and will not start on distroless/static")
			case elf.PT_DYNAMIC:
				t.Errorf("binary has a PT_DYNAMIC program header: it is dynamically linked and will not start on distroless/static")
			}
		}
		if f.Section(".dynamic") != nil {
			t.Errorf("binary has a .dynamic section: it is dynamically linked")
		}
		var dwarf []string
		for _, sec := range f.Sections {
			switch {
			case sec.Name == ".symtab":
				t.Errorf("binary has a symbol table: -ldflags -s did not strip it")
			case strings.HasPrefix(sec.Name, ".debug_") || strings.HasPrefix(sec.Name, ".zdebug_"):
				dwarf = append(dwarf, sec.Name)
			}
		}
		if len(dwarf) > 0 {
			t.Errorf("binary has DWARF sections %v: -ldflags -w did not drop them", dwarf)
		}
	}

	// -X stamped the version `buildfleet version` prints.
	out, err = exec.CommandContext(ctx, bin, "version").Output()
	if err != nil {
		t.Fatalf("%s version: %v", bin, err)
	}
	if got, want := string(out), "buildfleet "+version+"\n"; got != want {
		t.Errorf("%s version printed %q, want %q", bin, got, want)
	}
}
