//go:build tools

// Package etcd pins the etcd server the end-to-end tests run. It is its own module so that
// etcd never enters the product's go.mod; test/cluster/build.sh builds the command from it.
package etcd

import _ "go.etcd.io/etcd/server/v3"
