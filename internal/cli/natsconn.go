package cli

import (
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/buildfleet/buildfleet/internal/config"
)

// natsSecurity is the TLS and authentication the settings ask for, for every connection a
// buildfleet process makes (the worker's and the client commands').
func natsSecurity(s config.Settings) ([]nats.Option, error) {
	var opts []nats.Option
	switch {
	case s.NATSCreds != "":
		opts = append(opts, nats.UserCredentials(s.NATSCreds))
	case s.NATSUser != "":
		opts = append(opts, nats.UserInfo(s.NATSUser, s.NATSPassword))
	case s.NATSToken != "":
		opts = append(opts, nats.Token(s.NATSToken))
	case s.NATSNKeySeed != "":
		o, err := nats.NkeyOptionFromSeed(s.NATSNKeySeed)
		if err != nil {
			return nil, fmt.Errorf("BUILDFLEET_NATS_NKEY_SEED: %w", err)
		}
		opts = append(opts, o)
	}
	if s.NATSTLSCA != "" {
		opts = append(opts, nats.RootCAs(s.NATSTLSCA))
	}
	if s.NATSTLSCert != "" {
		opts = append(opts, nats.ClientCert(s.NATSTLSCert, s.NATSTLSKey))
	}
	return opts, nil
}
