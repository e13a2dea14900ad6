{
  "format": "edge-derm-screen/manifest-signature",
  "version": 1,
  "algorithm": "ed25519",
  "key_id": "ed25519:e71b73ea07d03145",
  "public_key": "oXw3cNpxMu7RNsWDNhieh0xwY1IbSGSnxIZ2mKhufBs=",
  "manifest_sha256": "df0a4e869d106e255add7440be9fa8d1751852a75e2d980b832eee365ea463e3",
  "signature": "2WY6ORcdKkNUzKZJI1VMuDR1kzjVQF4UkaxC7EF81MLcydyYJFkyzRFWGCOBtccfhgKtytupGEvS50RN2AGjBw=="
}
