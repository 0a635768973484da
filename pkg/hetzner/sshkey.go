package hetzner

import (
	"context"
	"crypto/md5"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"
)

// PublicKey is an OpenSSH public key read from an authorized_keys-style
// line.
type PublicKey struct {
	// Line is "type base64 [comment]" as uploaded.
	Line string
	// Fingerprint is the MD5 fingerprint in the colon-separated hex the
	// Hetzner API uses to identify keys.
	Fingerprint string
	// Comment is the key's comment (often user@host), possibly empty.
	Comment string
}

// ParsePublicKey parses one OpenSSH public key line. It checks that the
// base64 blob is well-formed and names the same key type as the line.
func ParsePublicKey(line string) (PublicKey, error) {
	fields := strings.Fields(strings.TrimSpace(line))
	if len(fields) < 2 {
		return PublicKey{}, fmt.Errorf("%w: ssh public key: want \"TYPE BASE64 [COMMENT]\"", ErrInvalid)
	}
	if strings.Contains(fields[0], "PRIVATE") || strings.HasPrefix(fields[0], "-----") {
		return PublicKey{}, fmt.Errorf("%w: ssh key file holds a private key; give the .pub file", ErrInvalid)
	}
	blob, err := base64.StdEncoding.DecodeString(fields[1])
	if err != nil {
		return PublicKey{}, fmt.Errorf("%w: ssh public key: bad base64", ErrInvalid)
	}
	if len(blob) < 4 {
		return PublicKey{}, fmt.Errorf("%w: ssh public key: truncated", ErrInvalid)
	}
	n := binary.BigEndian.Uint32(blob)
	if uint64(n)+4 > uint64(len(blob)) || string(blob[4:4+n]) != fields[0] {
		return PublicKey{}, fmt.Errorf("%w: ssh public key: blob does not match type %q", ErrInvalid, fields[0])
	}
	sum := md5.Sum(blob)
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02x", b)
	}
	pk := PublicKey{Line: fields[0] + " " + fields[1], Fingerprint: strings.Join(hexes, ":")}
	if len(fields) > 2 {
		pk.Comment = strings.Join(fields[2:], " ")
		pk.Line += " " + pk.Comment
	}
	return pk, nil
}

// ensureSSHKeys resolves the named keys (which must exist) and uploads
// each file key that no key in the project has, matching by fingerprint:
// the same key under another name is reused, not uploaded again.
func ensureSSHKeys(ctx context.Context, c *hcloud.Client, cluster string, names []string, files []PublicKey, progress func(string)) ([]*hcloud.SSHKey, error) {
	var out []*hcloud.SSHKey
	seen := map[int64]bool{}
	add := func(k *hcloud.SSHKey) {
		if !seen[k.ID] {
			seen[k.ID] = true
			out = append(out, k)
		}
	}
	for _, n := range names {
		k, _, err := c.SSHKey.GetByName(ctx, n)
		if err != nil {
			return nil, fmt.Errorf("ssh key %q: %w", n, err)
		}
		if k == nil {
			return nil, fmt.Errorf("ssh key %q does not exist in the project (upload it with --ssh-key-file)", n)
		}
		add(k)
	}
	for _, pk := range files {
		k, _, err := c.SSHKey.GetByFingerprint(ctx, pk.Fingerprint)
		if err != nil {
			return nil, fmt.Errorf("ssh key %s: %w", pk.Fingerprint, err)
		}
		if k == nil {
			name := sshKeyName(cluster, pk)
			k, _, err = c.SSHKey.Create(ctx, hcloud.SSHKeyCreateOpts{
				Name: name, PublicKey: pk.Line, Labels: ResourceLabels(cluster, "", nil),
			})
			if hcloud.IsError(err, hcloud.ErrorCodeUniquenessError) {
				// A retried create that had succeeded, or a race.
				k, _, err = c.SSHKey.GetByFingerprint(ctx, pk.Fingerprint)
				if err == nil && k == nil {
					err = fmt.Errorf("a different key is already named %q", name)
				}
			}
			if err != nil {
				return nil, fmt.Errorf("upload ssh key %s: %w", pk.Fingerprint, err)
			}
			progress(fmt.Sprintf("uploaded ssh key %q (%s)", k.Name, k.Fingerprint))
		}
		add(k)
	}
	return out, nil
}

// sshKeyName names an uploaded key after the cluster and its fingerprint,
// so that two keys never collide and the name says where it came from.
func sshKeyName(cluster string, pk PublicKey) string {
	return cluster + "-" + strings.ReplaceAll(pk.Fingerprint, ":", "")[:12]
}
