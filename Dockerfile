# syntax=docker/dockerfile:1
# buildfleet worker image: static binary on distroless, non-root.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/buildfleet/buildfleet/internal/cli.Version=${VERSION}" \
      -o /out/buildfleet ./cmd/buildfleet

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/buildfleet /buildfleet
USER 65532:65532
ENTRYPOINT ["/buildfleet"]
CMD ["worker"]
