// What every HCP console page shares: its state for people and tests, the
// token taken from the page's address, and the console websocket's URL.
//
//   #status                      what is going on, in words
//   body[data-state]             connecting | connected | disconnected | refused
//   body[data-reason]            the server's close reason, or why we stopped
//   document.title               "<the page's title>: <status text>"

const statusEl = document.getElementById('status');
const title = document.title;

export function show(state, text, reason) {
  document.body.dataset.state = state;
  if (reason !== undefined) {
    document.body.dataset.reason = reason;
  }
  statusEl.textContent = text;
  document.title = `${title}: ${text}`;
}

// The token from the page's address, which then drops it (it is single-use:
// out of the history and out of reloads); null, with the page saying so,
// when there is none.
export function takeToken() {
  const token = new URLSearchParams(location.search).get('token');
  if (!token) {
    show('disconnected', 'No console token in the page address. Open a new console from HCP.',
      'missing token');
    return null;
  }
  history.replaceState(null, '', location.pathname);
  return token;
}

// The websocket lives next to the page: /console/vnc.html -> /console/vnc.
// Resolving against the page keeps this right if the gateway is mounted
// under a prefix. Only the token is taken from the query string, so the page
// cannot be pointed at another host.
export function consoleSocketUrl(protocol, token) {
  const url = new URL(protocol, location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = `?token=${encodeURIComponent(token)}`;
  url.hash = '';
  return url.href;
}

// How the proxy turns a token away: a close code in 4000-4999 before the
// session was up.
export function isRefusal(code) {
  return code >= 4000 && code <= 4999;
}
