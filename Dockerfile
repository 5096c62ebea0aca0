# syntax=docker/dockerfile:1
# buildfleet worker image: static binary on distroless, non-root.
# `make image` builds it. The build stage runs `make build`, the same command as outside Docker,
# so the two cannot drift; cmd/buildfleet/image_test.go checks this file's shape and runs that
# command (make test).

FROM golang:1.26 AS build
WORKDIR /src
# The modules first, in their own layer and cache: a source change does not download them again.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
# CGO_ENABLED=0, -trimpath and -ldflags "-s -w -X .../internal/cli.Version=$VERSION" come from
# the Makefile's build target.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    make build BIN=/out/buildfleet VERSION=${VERSION}

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
LABEL org.opencontainers.image.source="https://github.com/buildfleet/buildfleet" \
      org.opencontainers.image.title="buildfleet" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/buildfleet /buildfleet
USER 65532:65532
# The worker serves /healthz, /readyz and /metrics here (BUILDFLEET_HTTP_ADDR).
EXPOSE 9090
ENTRYPOINT ["/buildfleet"]
CMD ["worker"]
