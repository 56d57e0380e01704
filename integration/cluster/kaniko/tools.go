//go:build tools

// Package tools pins the Kaniko executor that the test cluster's build
// image runs (#19), so that `go mod tidy` keeps its dependencies in go.sum.
package tools

import (
	_ "github.com/osscontainertools/kaniko/cmd/executor"
)
