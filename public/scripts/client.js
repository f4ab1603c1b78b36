// Placeholder client: shows that the page, its script and its stylesheet load over HTTPS.
// The calling app replaces this file.
document.getElementById('status').textContent = 'callgate is running.';
