"""Keys and the trust root, the fleet's PKI (CA, certificates, CRL), and the
broker configuration and ACLs made from it (docs/security.md)."""
