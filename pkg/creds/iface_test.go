package creds

import "github.com/meshd/meshd/pkg/agent"

// The component plugs into the agent's reconcile loop.
var _ agent.Component = (*Component)(nil)
