//go:build tools

// Package kube pins the Kubernetes control-plane commands the end-to-end tests run. It is its
// own module so that k8s.io/kubernetes never enters the product's go.mod; test/cluster/build.sh
// builds the commands from it.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
