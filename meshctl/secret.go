package main

import (
	"context"
	"errors"
)

// TODO(owner of secret.go): replace this stub.
func cmdSecret(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}
