package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultIsValid(t *testing.T) {
	c := Default()
	c.NodeName = "worker001"
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults invalid: %v", err)
	}
	if c.LeaseTTL.D() != 10*time.Second || c.Overlay.ListenPort != 51820 || c.HAProxy.ConfigPath == "/etc/haproxy.cfg" {
		t.Errorf("unexpected defaults: %+v", c)
	}
}

func TestLoadExpandsCredentialsAndRejectsUnknown(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.json")
	os.WriteFile(p, []byte(`{"nodeName":"n1","leaseTTL":"3s","etcd":{"endpoints":["https://10.0.0.2:2379"],
	  "caFile":"${CREDENTIALS_DIRECTORY}/ca.pem","certFile":"${CREDENTIALS_DIRECTORY}/cert.pem","keyFile":"${CREDENTIALS_DIRECTORY}/key.pem"}}`), 0o600)
	t.Setenv("CREDENTIALS_DIRECTORY", "/run/credentials/meshd.service")
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.Etcd.KeyFile != "/run/credentials/meshd.service/key.pem" || c.LeaseTTL.D() != 3*time.Second || c.Overlay.Interface != "meshd-wg" {
		t.Errorf("loaded %+v", c.Etcd)
	}
	os.WriteFile(p, []byte(`{"nodeName":"n1","overlay":{"listenport2":1}}`), 0o600)
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "listenport2") {
		t.Errorf("unknown field: %v", err)
	}
	os.WriteFile(p, []byte(`{"leaseTTL":10}`), 0o600)
	if _, err := Load(p); err == nil {
		t.Error("numeric duration accepted")
	}
}

func TestValidateNamesEveryProblem(t *testing.T) {
	c := Default()
	c.NodeName = "x\ny"
	c.LeaseTTL = Duration(time.Millisecond)
	c.OnStop = "linger"
	c.Etcd.Endpoints = nil
	c.Etcd.CertFile = "/c"
	c.Instances = []Instance{{App: "a", Group: "backends", Port: 1}, {App: "a", Group: "backends", Port: 2}}
	c.Overlay.Interface = "much-too-long-interface"
	c.Overlay.Mode = "fast"
	c.Overlay.RouteTable = 254
	c.Overlay.ImportKeyFile = "run/flannel/wgkey"
	c.HAProxy.ConfigPath = "/etc/haproxy.cfg"
	c.Secrets.WithKey = "null"
	c.Secrets.Units = map[string]SecretUse{"db": {Action: "kill"}}
	err := c.Validate()
	for _, want := range []string{"nodeName", "leaseTTL", "onStop", "etcd.endpoints", "certFile and keyFile", "declared twice",
		"overlay.interface", "overlay.mode", "overlay.routeTable", "overlay.importKeyFile", "haproxy.configPath", "secrets.withKey", "action"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %s", err, want)
		}
	}
	c = Default()
	c.NodeName = "n"
	c.Overlay.Enable = false
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "secrets.enable needs overlay.enable") {
		t.Errorf("secrets without overlay: %v", err)
	}
	c.Secrets.Enable = false
	c.Instances = []Instance{{App: "web", Group: "backends", Port: 8080, Check: Check{Timeout: Duration(-time.Second)}}}
	err = c.Validate()
	for _, want := range []string{"advertised with publicIPv4", "must not be negative"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("instances without an address, negative timeout: %v lacks %q", err, want)
		}
	}
	c.PublicIPv4 = "192.0.2.1"
	c.Instances[0].Check.Timeout = Duration(time.Second)
	if err := c.Validate(); err != nil {
		t.Errorf("instances advertised with publicIPv4: %v", err)
	}
}
