package daemon

import (
	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/config"
)

// buildInstances maps the configured instances to the agent's, with their
// checks: unit (if set) and a TCP connect, to check.tcp or else to the
// advertised address, must both pass.
func buildInstances(cfg config.Config, units agent.UnitStater) ([]agent.Instance, error) {
	var out []agent.Instance
	for _, in := range cfg.Instances {
		c := in.Check
		ai := agent.Instance{Group: in.Group, App: in.App, Port: in.Port, Interval: c.Interval.D(), Timeout: c.Timeout.D()}
		if !c.Disable {
			var checks []agent.Check
			if c.Unit != "" {
				checks = append(checks, agent.UnitCheck(units, c.Unit))
			}
			if c.TCP != "" {
				checks = append(checks, agent.TCPCheck(c.TCP))
			} else {
				checks = append(checks, agent.AdvertisedTCPCheck())
			}
			ai.Check = agent.AllChecks(checks...)
		}
		out = append(out, ai)
	}
	return out, nil
}
