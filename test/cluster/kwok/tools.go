//go:build tools

// Package kwok pins kwok, which simulates the nodes and drives build pods through the stages
// in test/cluster/stages.yaml. It is its own module so that kwok never enters the product's
// go.mod; test/cluster/build.sh builds the command from it.
package kwok

import _ "sigs.k8s.io/kwok/cmd/kwok"
