{
  "format": "edge-derm-screen/manifest-signature",
  "version": 1,
  "algorithm": "ed25519",
  "key_id": "ed25519:e71b73ea07d03145",
  "public_key": "oXw3cNpxMu7RNsWDNhieh0xwY1IbSGSnxIZ2mKhufBs=",
  "manifest_sha256": "b2d66bcd65d610b37cd51afa12e8c3dfb11156495e6b42450a41bb7287b26987",
  "signature": "lia8brCsOZmi/7e2epdwEnt3uNsJLWSQIFfWvFdYqhuybdIEVuWc0R5SxbtD2VMQz8ND4UsNdm6ZuRiwpmMmDQ=="
}
