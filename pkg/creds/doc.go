// Package creds delivers sealed secrets to a node as systemd credentials.
//
// Each node owns an age X25519 identity kept in its state directory; its
// public recipient is published in the node's member record. An operator
// (meshctl secret put) seals a value to each target node's recipient and
// writes one ciphertext per node under /meshd/secrets/<node>/<name>. The
// node's Component opens its own ciphertexts and hands the clear value,
// over a pipe only, to `systemd-creds encrypt`, which writes the encrypted
// credential into the credential store (/etc/credstore.encrypted), where
// units pick it up with LoadCredentialEncrypted=NAME.
//
// The clear value exists only in memory and on that pipe: never in etcd,
// in a log line, in the status, or in any file other than the credential.
package creds
