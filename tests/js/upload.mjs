// Uploads one bundle with tus-js-client (as the storefront would), resuming the upload its
// URL store remembers. Usage: node upload.mjs <endpoint> <token> <file> <url-store> <chunk-bytes>
// Prints the session id on success; exits 1 with the error otherwise.
import fs from 'node:fs'
import { Upload, FileUrlStorage } from 'tus-js-client'

const [endpoint, token, file, store, chunk] = process.argv.slice(2)
const upload = new Upload(fs.createReadStream(file), {
  endpoint,
  chunkSize: Number(chunk),
  headers: { Authorization: `Bearer ${token}` },
  metadata: { filename: file.split('/').pop() },
  urlStorage: new FileUrlStorage(store),
  storeFingerprintForResuming: true,
  removeFingerprintOnSuccess: true,
  retryDelays: [0, 500, 1000, 2000, 3000, 5000],
  onAfterResponse (req, res) {
    const session = res.getHeader('Upload-Session-Id')
    if (session) upload.sessionId = session
  },
  onError (error) {
    console.error(String(error))
    process.exit(1)
  },
  onSuccess () {
    console.log(upload.sessionId)
  },
})
const previous = await upload.findPreviousUploads()
if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0])
upload.start()
