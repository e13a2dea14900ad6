{
  "format": "edge-derm-screen/manifest-signature",
  "version": 1,
  "algorithm": "ed25519",
  "key_id": "ed25519:e71b73ea07d03145",
  "public_key": "oXw3cNpxMu7RNsWDNhieh0xwY1IbSGSnxIZ2mKhufBs=",
  "manifest_sha256": "f24a9fbcf7e65e1d2e7ac529c3fef77ee2f52b3e438d763a76e146b82da054a0",
  "signature": "Jr7DEU0vtXyJDtwlrQjDnqMT8K1256b5jpwkpQNDdmxcH3oONuNFiHknp6IrwJRYKmYpPSPWIjY723SkiH/DDg=="
}
