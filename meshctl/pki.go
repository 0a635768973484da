package main

import (
	"context"
	"errors"
)

// TODO(owner of pki.go): replace this stub.
func cmdPKI(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}

func cmdEtcd(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}
