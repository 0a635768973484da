package main

import (
	"context"
	"errors"
)

// TODO(owner of provision.go): replace this stub.
func cmdProvision(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}

func cmdDestroy(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}

func cmdCloud(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}
