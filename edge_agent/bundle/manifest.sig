{
  "format": "edge-derm-screen/manifest-signature",
  "version": 1,
  "algorithm": "ed25519",
  "key_id": "ed25519:e71b73ea07d03145",
  "public_key": "oXw3cNpxMu7RNsWDNhieh0xwY1IbSGSnxIZ2mKhufBs=",
  "manifest_sha256": "206df18d68b1ff7f3fe2c579e61f870e92d2ea2730964a7893fca364761407d3",
  "signature": "BVO34aNqqWuZ9eKdKLtCnYEVdRAs5Tcwi5s8V+1imsWjidGR8/X1Dbart40fOMe25zsk11qu6EEYs5IXvAoGCA=="
}
