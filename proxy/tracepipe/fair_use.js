// Fair use per caller (tracepipe.conf, "Fair use"): the key each request is counted under.
//
// Runs in the auth_request subrequest /_tp_fair_use/check. A bearer token whose ES256
// signature verifies against the stack's public keys (the JWKS file ext and PostgREST use,
// $tp_fair_use_jwks), and that has not expired, is counted under its API key ("key:<key_id>",
// the claim ext's POST /auth/token adds) or else its subject ("sub:<sub>"). Anything else (no
// token, a malformed or forged one, an unknown key id) is counted under the client's address
// ("ip:<addr>"): a forged token naming someone's subject never spends that person's budget.
// The count itself is nginx's limit_req, in the sub-subrequest /_tp_fair_use/count?k=<key>.
// The answer to nginx is 204 (go on) or 401 with X-Tp-Fair-Use: limited, which errors.conf's
// /_tp_error/unauthorized turns into the 429 (/_tp_error/rate_limited). A verified token's
// claims also come back signed HS256 with the proxy's key (X-Tp-Pgrst-Token), which
// pgrst_proxy.conf sends PostgREST instead (tracepipe/stack.py, PROXY_JWT_KEY: why).
//
// njs 0.7 (Debian bookworm's libnginx-mod-http-js 0.7.9): WebCrypto (crypto.subtle), async.

const fs = require('fs');

// DER prefix of a P-256 SubjectPublicKeyInfo; the point (04 || x || y) follows.
const SPKI_P256 = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d030107034200', 'hex');
const BEARER = /^Bearer +([A-Za-z0-9_-]{1,2048})\.([A-Za-z0-9_-]{1,8192})\.([A-Za-z0-9_-]{1,256})$/;

function b64url(text) {
    return Buffer.from(text, 'base64url');
}

// Read on every request: `tracepipe rotate-jwt-key` adds a key without a reload.
function findKey(r, kid) {
    const jwks = JSON.parse(fs.readFileSync(r.variables.tp_fair_use_jwks));
    const keys = jwks.keys || [];
    for (let i = 0; i < keys.length; i++) {
        const k = keys[i];
        if (k.kid === kid && k.kty === 'EC' && k.crv === 'P-256' && typeof k.x === 'string' && typeof k.y === 'string') {
            return k;
        }
    }
    return null;
}

// The verified caller of the token in Authorization, or null.
async function verifiedCaller(r) {
    const m = BEARER.exec(r.headersIn.Authorization || '');
    if (!m) {
        return null;
    }
    const header = JSON.parse(b64url(m[1]).toString());
    if (header.alg !== 'ES256' || typeof header.kid !== 'string') {
        return null;
    }
    const jwk = findKey(r, header.kid);
    if (!jwk) {
        return null;
    }
    const spki = Buffer.concat([SPKI_P256, Buffer.from([4]), b64url(jwk.x), b64url(jwk.y)]);
    const key = await crypto.subtle.importKey('spki', spki, {name: 'ECDSA', namedCurve: 'P-256'}, false, ['verify']);
    const signature = b64url(m[3]);
    if (signature.length !== 64) {
        return null;
    }
    const ok = await crypto.subtle.verify({name: 'ECDSA', hash: 'SHA-256'}, key, signature, m[1] + '.' + m[2]);
    if (!ok) {
        return null;
    }
    const claims = JSON.parse(b64url(m[2]).toString());
    if (typeof claims.exp !== 'number' || claims.exp <= Date.now() / 1000) {
        return null;
    }
    let caller = null;
    if (typeof claims.key_id === 'string' && claims.key_id) {
        caller = 'key:' + claims.key_id;
    } else if (typeof claims.sub === 'string' && claims.sub) {
        caller = 'sub:' + claims.sub;
    }
    return caller && {caller: caller, payload: m[2]};
}

// The same claims (the token's payload, byte for byte) signed HS256 with the proxy's key,
// for PostgREST (tracepipe/stack.py, PROXY_JWT_KEY: why).
const PROXY_HEADER = Buffer.from(JSON.stringify({alg: 'HS256', typ: 'JWT', kid: 'tp-proxy'})).toString('base64url');

function proxyToken(r, payload) {
    const secret = fs.readFileSync(r.variables.tp_fair_use_proxy_key).toString().trim();
    const input = PROXY_HEADER + '.' + payload;
    return input + '.' + require('crypto').createHmac('sha256', secret).update(input).digest('base64url');
}

async function check(r) {
    let verified = null;
    try {
        verified = await verifiedCaller(r);
    } catch (e) {
        verified = null;  // a token that does not even parse: counted under the address
    }
    const key = verified ? verified.caller : 'ip:' + r.variables.remote_addr;
    const reply = await r.subrequest('/_tp_fair_use/count', {args: 'k=' + encodeURIComponent(key)});
    if (reply.status === 429) {
        r.headersOut['X-Tp-Fair-Use'] = 'limited';
        r.return(401);
        return;
    }
    if (verified) {
        r.headersOut['X-Tp-Pgrst-Token'] = proxyToken(r, verified.payload);
    }
    r.return(204);
}

function pass(r) {
    r.return(204);
}

export default {check, pass};
