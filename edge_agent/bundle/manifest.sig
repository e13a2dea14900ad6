{
  "format": "edge-derm-screen/manifest-signature",
  "version": 1,
  "algorithm": "ed25519",
  "key_id": "ed25519:e71b73ea07d03145",
  "public_key": "oXw3cNpxMu7RNsWDNhieh0xwY1IbSGSnxIZ2mKhufBs=",
  "manifest_sha256": "ed9d2c41727d507f8b5e2de3b6c72682fa8f1466f2a78c36ee9962fe859c0b17",
  "signature": "36OZrZ8RJAFMiCpGLpoZQmaIHv0WRGHTOPxpHiRie6l3y5Ux7VjNNng/BK2babuQbGl8VQNS3dF2y/8mYhe9Bw=="
}
