"""The console's labels in Chinese and English; a page is in the language the staff chose
(cookie), else the browser's first preference, else Chinese."""

from __future__ import annotations

from collections.abc import Callable

LANGUAGES = ("zh", "en")

LABELS: dict[str, tuple[str, str]] = {  # key: (zh, en)
    "app_title": ("社保卡业务台", "Card Desk console"),
    "sign_in": ("登录", "Sign in"),
    "sign_out": ("退出", "Sign out"),
    "staff_id": ("工号", "Staff ID"),
    "password": ("密码", "Password"),
    "signed_in_as": ("当前用户", "Signed in as"),
    "role": ("角色", "Role"),
    "role_reviewer": ("审核员", "Reviewer"),
    "role_counter": ("柜台", "Counter"),
    "role_auditor": ("审计员", "Auditor"),
    "role_admin": ("管理员", "Administrator"),
    "nav_review": ("补卡审核", "Review queue"),
    "nav_counter": ("柜台领卡", "Counter"),
    "nav_lookup": ("查询", "Citizen lookup"),
    "nav_audit": ("审计", "Audit"),
    "bad_credentials": ("工号或密码错误。", "Wrong staff ID or password."),
    "locked": ("错误次数过多，账号已锁定，请稍后再试。",
               "Too many wrong passwords: the account is locked for a while."),
    "busy": ("登录请求过多，请稍后再试。", "Too many sign-ins at once: try again in a moment."),
    "too_many_sign_ins": ("此地址登录尝试过多，请稍后再试。",
                          "Too many sign-in attempts from this address: try again later."),
    "forbidden": ("您的角色无权访问此页面。", "Your role may not use this page."),
    "csrf_refused": ("表单已过期或无效，请重新打开页面后再提交。",
                     "This form has expired or is not valid: open the page again and resubmit."),
    "too_large": ("提交的内容过长。", "What was sent is too long."),
    "bad_form": ("表单内容无效。", "The form is not valid."),
    "queue_title": ("待审核的补卡申请", "Pending reissue applications"),
    "queue_empty": ("没有待审核的申请。", "No application is waiting."),
    "oldest_first": ("按申请时间排序（最早在前）", "Oldest first"),
    "bureau": ("领卡网点", "Pickup bureau"),
    "all_bureaus": ("全部网点", "All bureaus"),
    "filter": ("筛选", "Filter"),
    "application": ("申请", "Application"),
    "applied_at": ("申请时间", "Applied at"),
    "resubmission": ("重新提交", "Resubmission"),
    "open": ("打开", "Open"),
    "citizen": ("公民（编号）", "Citizen (reference)"),
    "card_status": ("卡状态", "Card status"),
    "card_no": ("卡号", "Card number"),
    "loss": ("挂失", "Loss"),
    "loss_kind_formal": ("正式挂失", "formal"),
    "loss_kind_temporary": ("临时挂失", "temporary"),
    "portrait_verified_at": ("人像核验时间", "Portrait verified at"),
    "not_found": ("未找到", "Not found"),
    "personal_data": ("重新登记的个人信息", "Re-recorded personal information"),
    "personal_data_masked": (
        "地址、电话和照片以密文保存在审核服务中，此页面仅显示脱敏信息。",
        "Address, phone and photo are held encrypted by the review service; this page shows "
        "masked information only."),
    "decision": ("审核决定", "Decision"),
    "approve": ("通过", "Approve"),
    "reject": ("驳回", "Reject"),
    "reason": ("理由", "Reason"),
    "reason_required": ("驳回必须填写理由。", "A rejection needs a reason."),
    "reply": ("处理结果", "Reply"),
    "accepted": ("已受理", "Accepted"),
    "rejected": ("被拒绝", "Refused"),
    "already_decided": ("该申请已由其他审核员处理。",
                        "Another reviewer has decided this application already."),
    "no_reply": ("暂未收到处理结果，请稍后在查询中确认。",
                 "No reply yet: check the citizen's status in a moment."),
    "back_to_queue": ("返回队列", "Back to the queue"),
    "timeline": ("办理记录", "Timeline"),
    "time": ("时间", "Time"),
    "event": ("事项", "Event"),
    "description": ("说明", "Description"),
    "id_number": ("身份证号码", "ID number"),
    "find": ("查找", "Find"),
    "counter_title": ("领取新卡", "Card collection"),
    "ready_for_pickup": ("新卡已可领取", "The new card is ready for pickup"),
    "not_ready": ("该公民没有待领取的新卡。", "This citizen has no card ready for pickup."),
    "presented_id_number": ("出示证件号码", "Presented ID number"),
    "by_proxy": ("代领", "Collected by a proxy"),
    "proxy_id_number": ("代领人身份证号码", "Proxy's ID number"),
    "proxy_name": ("代领人姓名", "Proxy's name"),
    "authorisation_ref": ("授权书编号", "Authorisation letter reference"),
    "record_collection": ("确认领取", "Record the collection"),
    "collected": ("已领取，新卡号：", "Collected; the new card number:"),
    "invalid_id_number": ("身份证号码格式无效。", "Not a valid ID number."),
    "lookup_title": ("查询卡状态和办理记录", "Card status and timeline"),
    "lookup_hint": ("身份证号码或公民编号", "ID number or citizen reference"),
    "look_up": ("查询", "Look up"),
    "audit_title": ("日志校验与重放", "Log verification and replay"),
    "audit_verify": ("校验事件日志哈希链", "Verify every stream's hash chain"),
    "audit_replay": ("重放并与状态比对", "Replay the log and compare with the status"),
    "scope_all": ("全部公民", "Every citizen"),
    "scope_one": ("一位公民（身份证号码）", "One citizen (ID number)"),
    "run": ("运行", "Run"),
    "audit_busy": ("已有审计任务在运行。", "An audit is running already."),
    "progress": ("进度", "Progress"),
    "state_running": ("运行中", "running"),
    "state_passed": ("通过", "passed"),
    "state_failed": ("发现问题", "failed"),
    "state_error": ("出错", "error"),
    "status_unavailable": ("状态服务暂不可用。", "The status service does not answer."),
    "language": ("English", "中文"),
}


def choose_language(cookie: str | None, accept_language: str | None) -> str:
    if cookie in LANGUAGES:
        return cookie
    for part in (accept_language or "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGUAGES:
            return code
    return "zh"


def translator(language: str) -> Callable[[str], str]:
    index = LANGUAGES.index(language) if language in LANGUAGES else 0

    def t(key: str) -> str:
        labels = LABELS.get(key)
        return labels[index] if labels else key

    return t
