package main

import (
	"context"
	"errors"
)

// TODO(foundation): replace this stub.
func cmdNode(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}
func cmdApp(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}
func cmdStatus(ctx context.Context, e *env, args []string) error {
	return errors.New("not implemented yet")
}
