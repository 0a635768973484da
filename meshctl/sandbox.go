package main

import (
	"context"
	"errors"
)

// TODO(owner of sandbox.go): replace this stub.
func cmdSandbox(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}
