// Package keda checks the shipped KEDA autoscaling (deploy/overlays/keda/scaledobject.yaml)
// with KEDA's own nats-jetstream scaler against a real nats-server holding buildfleet's
// JetStream layout: the replica counts the HPA would ask for follow from the file as shipped.
//
// It is its own module because KEDA's pkg/scalers brings in every cloud SDK it supports;
// none of that enters the product's go.mod. Run it with `go test ./...` from test/keda.
package keda
