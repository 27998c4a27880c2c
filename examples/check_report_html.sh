#!/usr/bin/env bash
# Render a `ches-filter report` page in real headless Chromium and save a screenshot.
#
#   bash examples/check_report_html.sh REPORT_DIR [SCREENSHOT.png] [HEIGHT]
#
# Needs Chromium (Debian: `apt-get install -y chromium`). Prints the page title
# Chromium parsed, the number of <img> and table rows it rendered, and where the
# screenshot is; open the PNG and look at it. Exits 1 if the page has no title,
# no inline plot, or Chromium fails.
set -euo pipefail

dir=${1:?usage: check_report_html.sh REPORT_DIR [SCREENSHOT.png] [HEIGHT]}
shot=${2:-$dir/screenshot.png}
height=${3:-3200}
page=$(cd "$dir" && pwd)/report.html
[ -f "$page" ] || { echo "no report.html in $dir" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "Chromium not found; install it with: apt-get install -y chromium" >&2; exit 1; }

# --no-sandbox: containers usually run as root, where Chromium's sandbox refuses to start.
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-dev-shm-usage)
dom=$(mktemp)
trap 'rm -f "$dom"' EXIT
"$browser" "${flags[@]}" --dump-dom "file://$page" >"$dom" 2>/dev/null
"$browser" "${flags[@]}" --window-size=1320,"$height" --screenshot="$shot" "file://$page" >/dev/null 2>&1

title=$(sed -n 's:.*<title>\(.*\)</title>.*:\1:p' "$dom" | head -1)
images=$(grep -o '<img [^>]*src="data:image/png;base64,' "$dom" | wc -l || true)
rows=$(grep -o '<tr>' "$dom" | wc -l || true)
echo "title: $title"
echo "inline plots: $images, table rows: $rows"
echo "screenshot: $shot ($(stat -c %s "$shot") bytes)"
[ -n "$title" ] && [ "$images" -ge 2 ] && [ -s "$shot" ]
