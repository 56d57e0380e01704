//go:build tools

// Package tools pins the CoreDNS main package that integration/cluster.sh
// builds, so that `go mod tidy` keeps its dependencies in go.sum.
package tools

import (
	_ "github.com/coredns/coredns"
)
